"""Shared pieces of the CUDA tests: the device, the skip, relative errors, and a small-but-real config.

Every test here is marked `gpu` and skips with "needs a CUDA GPU" where torch sees none (CI). To develop
these tests without a GPU, `HF_MOE_GPU_TESTS_ON_CPU=1` runs them on the CPU instead (backends that need CUDA
still skip): that checks the tests' own logic, not the CUDA paths.
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_moe import MoEConfig
from tests.conftest import tiny_config

ON_CPU = os.environ.get("HF_MOE_GPU_TESTS_ON_CPU") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")

gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA and not ON_CPU, reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _exact_fp32() -> None:
    """fp32 products in full fp32 (no TF32) for the duration of a test, whatever the process set before."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64 (METHOD: fp32 lands far under 1e-3, bf16 operands near 1e-3..1e-2)."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def row_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Relative error of each row (last dim), e.g. one per token of a logits tensor."""
    got, want = got.double().flatten(0, -2), want.double().flatten(0, -2)
    return (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)


def cuda_config(**overrides: object) -> MoEConfig:
    """Larger than the CPU tests' tiny config so that the CUDA kernels see real tiles (many tokens per expert,
    widths that are and are not multiples of 16), still built in milliseconds: 3 layers (1 dense), MLA, 16
    routed experts top-4 in 4 groups, 1 shared expert, sdpa attention."""
    fields: dict = dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, n_group=4, topk_group=2,
        max_position_embeddings=512, attn_implementation="sdpa",
    )
    fields.update(overrides)
    return tiny_config(**fields)
