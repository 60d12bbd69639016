"""Expert backends for transformers' experts interface, and the `hf_moe_auto` choice among them.

Every backend has the interface's signature `fn(experts, hidden_states (T, H), top_k_index (T, K),
top_k_weights (T, K)) -> (T, H)` and is registered by name (see `BACKENDS`). A backend asked for by name
that cannot run here raises; `hf_moe_auto` picks one per device, dtype and phase and logs its choice once.
While torch.compile / torch.export traces, the fused backends run `traced.traced_fused_experts` (no host syncs)
and `hf_moe_auto` logs nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from ...modeling.experts import tracing
from ..eligible import eligible
from .fused import fused_experts, supports_fused
from .traced import traced_fused_experts

logger = logging.getLogger(__name__)

DECODE_MAX_TOKENS = 64  # a forward over at most this many tokens without grad counts as "decode"


def _check_layout(experts: nn.Module, name: str) -> None:
    if not supports_fused(experts):
        raise ValueError(
            f"experts_implementation={name!r} needs concatenated [gate; up] SwiGLU (silu) experts without biases, "
            f"post-expert norm or expert parallelism; {type(experts).__name__} is not one. Use 'grouped_mm' or 'eager'."
        )


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """torch's grouped GEMM runs here: CPU (torch >= 2.9), or bf16 on CUDA compute capability >= 8.0."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runnable(device: torch.device) -> bool:
    """Triton kernels run on CUDA/XPU devices, and on CPU only under its interpreter (TRITON_INTERPRET=1)."""
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return device.type in ("cuda", "xpu")


def hub_kernel_available(device: torch.device) -> bool:
    """The Hub's `kernels` package can load transformers' sonic-moe kernel here (CUDA SM90+)."""
    if device.type != "cuda" or importlib.util.find_spec("kernels") is None:
        return False
    from transformers.integrations.sonicmoe import is_sonicmoe_loadable

    return bool(is_sonicmoe_loadable())


def fused_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """`hf_moe_fused`: one sort, gather, one matmul per active expert, hand-written backward."""
    _check_layout(experts, "hf_moe_fused")
    if tracing():
        return traced_fused_experts(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj)
    return fused_experts(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj, "loop")


def fused_grouped_mm_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """`hf_moe_grouped_mm`: the fused path with torch's grouped GEMM for the expert matmuls."""
    _check_layout(experts, "hf_moe_grouped_mm")
    if not grouped_mm_available(hidden_states.device, experts.gate_up_proj.dtype):
        raise RuntimeError(f"experts_implementation='hf_moe_grouped_mm': torch grouped_mm is unavailable for "
                           f"{experts.gate_up_proj.dtype} on {hidden_states.device} with torch {torch.__version__}.")
    if tracing():
        return traced_fused_experts(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj,
                                    "grouped_mm")
    return fused_experts(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj,
                         "grouped_mm")


def triton_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """`hf_moe_triton`: fused Triton kernels (gather + SwiGLU + routing weight in the GEMM), forward and backward."""
    _check_layout(experts, "hf_moe_triton")
    if not triton_available():
        raise ImportError("experts_implementation='hf_moe_triton' needs Triton: pip install 'hf-moe[triton]'.")
    if not triton_runnable(hidden_states.device):
        raise RuntimeError(f"experts_implementation='hf_moe_triton' cannot run on {hidden_states.device}: Triton "
                           "needs a GPU (or TRITON_INTERPRET=1 on CPU, for testing only).")
    from .triton_experts import triton_experts

    return triton_experts(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj)


def hub_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
    """`hf_moe_hub`: the Hub kernel `kernels-community/sonic-moe` through the `kernels` package (CUDA SM90+)."""
    if importlib.util.find_spec("kernels") is None:
        raise ImportError("experts_implementation='hf_moe_hub' needs the Hub's kernels package: pip install kernels.")
    from transformers.integrations.sonicmoe import is_sonicmoe_loadable, sonicmoe_experts_forward

    is_sonicmoe_loadable(raise_error=True)
    return sonicmoe_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


def phase_of(experts: nn.Module, hidden_states: torch.Tensor) -> str:
    """"training" when autograd records this call, else "decode" for a few tokens and "prefill" otherwise."""
    if torch.is_grad_enabled() and (hidden_states.requires_grad or experts.gate_up_proj.requires_grad):
        return "training"
    return "decode" if hidden_states.shape[0] <= DECODE_MAX_TOKENS else "prefill"


def choose_backend(experts: nn.Module, hidden_states: torch.Tensor, phase: str) -> str:
    """The backend `hf_moe_auto` runs for this device, dtype and phase.

    CPU: `hf_moe_fused` for every phase where the one eligibility rule allows (fp32, no autocast: what was
    measured; per-expert matmuls on the process's fp32 GEMM, see `kernels.cpu.gemm`; on torch.mm as fast as
    torch's CPU grouped_mm, which loops over groups too, with no alignment rules; decode touches only the chosen
    experts), the experts' own eager forward otherwise.
    CUDA: the Hub's sonic-moe kernel for bf16/fp16 training and prefill when it loads; otherwise transformers'
    own `grouped_mm` (no host sync). On an H200 our fused path on torch's grouped GEMM measured 1.01x of it for
    the MoE layer and 0.96x for the training step (benchmarks/results/gpu.md), not faster, and our per-expert
    path syncs with the host: so transformers' kernel runs until a GPU measurement says otherwise. The Triton
    backend is chosen only by name (4.3x slower than grouped_mm there).
    Layouts the fused kernels do not cover use transformers' `grouped_mm` where torch's grouped GEMM can take
    their strides (16-byte aligned rows on CPU), the experts' eager forward otherwise.
    """
    device = hidden_states.device
    if not supports_fused(experts):
        return "grouped_mm" if device.type != "cpu" or _rows_aligned(experts) else "eager"
    if device.type == "cpu" and not eligible(hidden_states, experts.gate_up_proj, experts.down_proj,
                                                  traceable=True):
        return "eager"
    if device.type == "cuda":
        if phase != "decode" and hidden_states.dtype in (torch.bfloat16, torch.float16) and hub_kernel_available(device):
            return "hf_moe_hub"
        return "grouped_mm"
    return "hf_moe_fused"


def _rows_aligned(experts: nn.Module) -> bool:
    """Every expert weight's rows start on a 16-byte boundary, as torch's CPU grouped GEMM requires."""
    weights = [w for w in (getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)) if w is not None]
    return all(w.shape[-1] * w.element_size() % 16 == 0 for w in weights)


_logged_choices: set[tuple] = set()


def auto_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
    """`hf_moe_auto`: run the backend `choose_backend` picks; log each new choice once."""
    phase = phase_of(experts, hidden_states)
    name = choose_backend(experts, hidden_states, phase)
    key = (hidden_states.device.type, hidden_states.dtype, phase, name)
    if key not in _logged_choices and not tracing():
        _logged_choices.add(key)
        logger.info("hf_moe_auto experts backend: %s (device=%s, dtype=%s, phase=%s)", name, key[0], key[1], phase)
    if name == "grouped_mm":
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    if name == "eager":  # the class's own forward, which `@use_experts_implementation` wraps (functools.wraps)
        return type(experts).forward.__wrapped__(experts, hidden_states, top_k_index, top_k_weights)
    return BACKENDS[name](experts, hidden_states, top_k_index, top_k_weights)


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "hf_moe_fused": fused_forward,
    "hf_moe_grouped_mm": fused_grouped_mm_forward,
    "hf_moe_triton": triton_forward,
    "hf_moe_hub": hub_forward,
    "hf_moe_auto": auto_forward,
}
