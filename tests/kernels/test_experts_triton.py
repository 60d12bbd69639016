"""The Triton experts kernels equal the eager reference, forward and backward, under TRITON_INTERPRET=1 on CPU
(tiny shapes: the interpreter is slow). Skipped when triton is not installed (extra: triton)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'hf-moe[triton]')", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton and the kernels are first imported

from hf_moe.kernels.experts import triton_experts as kernels  # noqa: E402
from tests.kernels.test_experts_backends import assert_matches_eager, make_experts, random_routing, run  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled on a GPU, interpreted on CPU


def experts_of(**sizes: object) -> torch.nn.Module:
    return make_experts(**sizes).to(DEVICE)


def routing(tokens: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, weights = random_routing(tokens, num_experts, top_k)
    return ids.to(DEVICE), weights.to(DEVICE)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).to(DEVICE)


pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and type(kernels._segment_gemm_kernel).__name__ != "InterpretedFunction",
    reason="no GPU, and the kernels were defined before TRITON_INTERPRET=1 was set",
)


def test_random_inputs_match_eager() -> None:
    experts = experts_of(num_experts=4, hidden=40, inter=24)  # widths not multiples of the block sizes
    ids, weights = routing(21, 4, 2)
    assert_matches_eager(experts, "hf_moe_triton", randn(21, 40), ids, weights, grad=randn(21, 40))


def test_edge_cases_match_eager() -> None:
    experts = experts_of(num_experts=4, hidden=16, inter=16)
    x = randn(18, 16)
    one_expert = torch.zeros(18, 1, dtype=torch.long, device=DEVICE)  # all tokens on expert 0, three experts empty
    assert_matches_eager(experts, "hf_moe_triton", x, one_expert, torch.rand(18, 1, device=DEVICE), grad=randn(18, 16))
    ids, weights = routing(1, 4, 2)  # a single token
    assert_matches_eager(experts, "hf_moe_triton", x[:1], ids, weights, grad=None)  # non-contiguous grad
    grads = run(experts, "hf_moe_triton", x, one_expert, torch.rand(18, 1, device=DEVICE), None)
    assert grads[2][1:].abs().sum() == 0 and grads[3][1:].abs().sum() == 0


def test_bf16_close_to_eager() -> None:
    experts = experts_of(num_experts=4, hidden=16, inter=16, dtype=torch.bfloat16)
    ids, weights = routing(6, 4, 2)
    x, grad = randn(6, 16, dtype=torch.bfloat16), randn(6, 16, dtype=torch.bfloat16)
    reference = run(experts, "eager", x, ids, weights.bfloat16(), grad)
    result = run(experts, "hf_moe_triton", x, ids, weights.bfloat16(), grad)
    for got, want in zip(result, reference):  # output and the four gradients
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2 * want.float().abs().max().item())
