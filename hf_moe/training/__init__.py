"""Training MoE models the way the papers describe, with the HF Trainer, accelerate or a plain loop.

- `MoECallback` (Trainer) / `update_router_biases(model)` (plain loops, accelerate: call once per optimizer step):
  auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2).
- Balance losses and the MTP loss are part of the model's forward (`loss`, `aux_loss`, `mtp_loss`).
- Metrics: `ExpertLoads` (tokens per expert, MaxVio), `expert_load(model, batches)` over an eval set;
  `dead_experts`, `routing_entropy`, `load_percentiles` (shared with `hf_moe.analysis`).
- Finetuning recipes: `apply_recipe(model, "freeze-router" | "freeze-routed-experts" | "moe-only" | "esft" |
  "lora" | "full", **options)`; ESFT expert selection `select_experts(model, dataset, criterion, threshold)`;
  `save_finetuned_delta` / `apply_finetuned_delta` keep only what a recipe trained.
"""

from .balancing import (
    ExpertLoads,
    find_routers,
    freeze_router_biases,
    max_violation,
    read_expert_counts,
    reset_expert_counters,
    update_router_biases,
)
from .callbacks import MoECallback, mark_moe_blocks_as_zero3_leaves
from .delta import apply_finetuned_delta, save_finetuned_delta
from .expert_selection import expert_scores, load_expert_selection, save_expert_selection, select_experts
from .frozen_experts import freeze_experts, restore_frozen_experts
from .metrics import (
    RouterLoadRecorder,
    RoutingEntropyMeter,
    dead_experts,
    expert_load,
    load_percentiles,
    routing_entropy,
)
from .recipes import RECIPES, RecipeReport, apply_recipe

__all__ = [
    "ExpertLoads",
    "MoECallback",
    "RECIPES",
    "RecipeReport",
    "RouterLoadRecorder",
    "RoutingEntropyMeter",
    "apply_finetuned_delta",
    "apply_recipe",
    "dead_experts",
    "expert_load",
    "expert_scores",
    "find_routers",
    "freeze_experts",
    "freeze_router_biases",
    "load_expert_selection",
    "load_percentiles",
    "mark_moe_blocks_as_zero3_leaves",
    "max_violation",
    "read_expert_counts",
    "reset_expert_counters",
    "restore_frozen_experts",
    "routing_entropy",
    "save_expert_selection",
    "save_finetuned_delta",
    "select_experts",
    "update_router_biases",
]
