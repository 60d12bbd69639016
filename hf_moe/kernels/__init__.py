"""Fast expert backends, registered by name into transformers' experts interface at import.

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="hf_moe_fused")
    model.set_experts_implementation("hf_moe_auto")     # hf_moe models also accept "auto" (their default)

Names: `hf_moe_fused` (sorted slots, per-expert matmuls, hand-written backward), `hf_moe_grouped_mm` (the
same on torch's grouped GEMM), `hf_moe_triton` (Triton kernels; extra `triton`), `hf_moe_hub` (the Hub's
`kernels` package: sonic-moe), `hf_moe_auto` (picks one per device, dtype and phase, logs it). Triton and the
Hub kernel are imported only when called. hf_moe/modeling never imports this package, so remote-code
exports keep working with transformers' own backends.
"""

from __future__ import annotations

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .backends import BACKENDS, choose_backend
from .fused import fused_experts


def register_backends() -> None:
    """Add every hf_moe backend to transformers' experts interface (idempotent)."""
    for name, function in BACKENDS.items():
        ALL_EXPERTS_FUNCTIONS.register(name, function)


register_backends()

__all__ = ["BACKENDS", "choose_backend", "fused_experts", "register_backends"]
