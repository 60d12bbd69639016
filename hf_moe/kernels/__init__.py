"""Everything fast, registered by `import hf_moe`; imports hf_moe.modeling, never the reverse.

    model = AutoModelForCausalLM.from_pretrained(path)               # hf_moe's defaults: "hf_moe_auto" experts,
                                                                     # "hf_moe_sdpa" attention, the CPU kernels
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")  # torch's sdpa, exactly
    model.set_experts_implementation("hf_moe_fused")
    hf_moe.kernels.set_cpu_gemm("aten")                             # or HF_MOE_CPU_GEMM=aten

`register_kernels()` (run at import, idempotent) adds
- to transformers' experts interface: `hf_moe_fused`, `hf_moe_grouped_mm`, `hf_moe_triton`, `hf_moe_hub`,
  `hf_moe_auto` (experts/backends.py);
- to transformers' attention interface (and its mask interface, with sdpa's masks): "hf_moe_sdpa"
  (cpu/attention.py), which hf_moe models take for `attn_implementation=None` or "auto";
- to the model's seam (`hf_moe.modeling.kernel_hooks`): "linear", "rms_norm", "rope", "swiglu",
  "mla_attention", "causal_lm_loss", "lm_head_loss" (cpu/*.py).
Whether a kernel takes a call is decided by one rule (eligible.py): CPU, fp32, no autocast, the grad mode
the kernel is for, plain unhooked modules. Everywhere else the reference model runs.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..modeling.attention import HF_MOE_ATTENTION
from ..modeling.kernel_hooks import register_kernel
from .cpu.attention import hf_moe_sdpa_attention
from .cpu.gemm import cpu_gemm, linear_kernel, set_cpu_gemm
from .cpu.lm_loss import causal_lm_loss_kernel, lm_head_loss_kernel
from .cpu.mla_attention import mla_attention_kernel
from .cpu.rms_norm import rms_norm_kernel
from .cpu.rope import rope_kernel
from .cpu.swiglu import swiglu_kernel
from .experts.backends import BACKENDS, choose_backend

SEAM_KERNELS: dict[str, Callable] = {
    "linear": linear_kernel,
    "rms_norm": rms_norm_kernel,
    "rope": rope_kernel,
    "swiglu": swiglu_kernel,
    "mla_attention": mla_attention_kernel,
    "causal_lm_loss": causal_lm_loss_kernel,
    "lm_head_loss": lm_head_loss_kernel,
}


def register_kernels() -> None:
    """Register every hf_moe kernel with transformers' interfaces and the model's seam (idempotent)."""
    for name, function in BACKENDS.items():
        ALL_EXPERTS_FUNCTIONS.register(name, function)
    ALL_ATTENTION_FUNCTIONS.register(HF_MOE_ATTENTION, hf_moe_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(HF_MOE_ATTENTION, sdpa_mask)
    for name, function in SEAM_KERNELS.items():
        register_kernel(name, function)


register_kernels()

__all__ = ["BACKENDS", "SEAM_KERNELS", "choose_backend", "cpu_gemm", "register_kernels", "set_cpu_gemm"]
