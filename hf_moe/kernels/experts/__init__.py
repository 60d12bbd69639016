"""Routed-experts backends for transformers' experts interface: `fused` (sorted slots, per-expert or grouped
matmuls, hand-written backward), `triton_experts` (Triton kernels, extra `triton`) and `backends` (the named
entries and the `hf_moe_auto` choice)."""
