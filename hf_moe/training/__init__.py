"""Training MoE models the way the papers describe, with the HF Trainer, accelerate or a plain loop.

- `MoECallback` (Trainer) / `update_router_biases(model)` (plain loops, accelerate: call once per optimizer step):
  auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2).
- Balance losses and the MTP loss are part of the model's forward (`loss`, `aux_loss`, `mtp_loss`).
- Metrics: `ExpertLoads` (tokens per expert, MaxVio), `expert_load(model, batches)` over an eval set.
"""

from .balancing import (
    ExpertLoads,
    find_routers,
    max_violation,
    read_expert_counts,
    reset_expert_counters,
    update_router_biases,
)
from .callbacks import MoECallback
from .metrics import RouterLoadRecorder, expert_load

__all__ = [
    "ExpertLoads",
    "MoECallback",
    "RouterLoadRecorder",
    "expert_load",
    "find_routers",
    "max_violation",
    "read_expert_counts",
    "reset_expert_counters",
    "update_router_biases",
]
