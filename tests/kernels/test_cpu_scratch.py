"""Scratch memory: a pooled buffer is handed out again only when no tensor references it (aliasing is impossible
whatever the order of statements), memory is reused once free, the pool stays within its bound and can be
released, inference-mode buffers stay apart; the kernels that use it give the same results when it is off."""

from __future__ import annotations

import pytest
import torch

from hf_moe.kernels.cpu import scratch as scratch_module
from hf_moe.kernels.cpu.scratch import pooled_bytes, release, scratch, set_pool_bytes
from hf_moe.kernels.experts.fused import fused_experts

LIKE = torch.empty(0)
SHAPE = (256, 256)  # 256 KiB of fp32: pooled
MIB = 2**20


@pytest.fixture(autouse=True)
def _fresh_pool() -> None:
    release()
    yield
    release()


def memory(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = memory(a), memory(b)
    return a0 < b1 and b0 < a1


def test_live_buffers_never_alias_and_free_ones_are_reused() -> None:
    first, second = scratch(SHAPE, LIKE), scratch(SHAPE, LIKE)
    assert not overlap(first, second)
    view = first[3:5].t()  # a view keeps the memory in use
    address = first.data_ptr()
    del first
    third = scratch(SHAPE, LIKE)
    assert not overlap(third, view) and not overlap(third, second)
    del view  # now nothing references the first buffer
    assert scratch(SHAPE, LIKE).data_ptr() == address
    assert pooled_bytes() == 3 * SHAPE[0] * SHAPE[1] * 4


def test_a_smaller_request_fits_in_a_free_larger_buffer_and_dtypes_stay_apart() -> None:
    big = scratch((512, 512), LIKE)
    address = big.data_ptr()
    del big
    assert scratch((300, 300), LIKE).data_ptr() == address
    assert scratch((300, 300), LIKE.double()).data_ptr() != address


def test_the_pool_is_bounded_and_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scratch_module, "POOL_BYTES", 3 * MIB)
    held = [scratch((MIB // 4,), LIKE) for _ in range(5)]  # 5 MiB asked, all alive at once
    assert pooled_bytes() <= 3 * MIB
    assert len({t.data_ptr() for t in held}) == 5
    del held
    for _ in range(10):
        scratch((MIB // 4,), LIKE)
    assert pooled_bytes() <= 3 * MIB
    release()
    assert pooled_bytes() == 0
    set_pool_bytes(0)  # pooling off: every request is a fresh tensor
    assert scratch((MIB // 4,), LIKE).numel() == MIB // 4 and pooled_bytes() == 0
    with pytest.raises(ValueError, match="limit=-1"):
        set_pool_bytes(-1)


def test_inference_mode_buffers_are_kept_apart() -> None:
    with torch.inference_mode():
        inner = scratch(SHAPE, LIKE)
        address = inner.data_ptr()
        del inner
    outside = scratch(SHAPE, LIKE)
    assert outside.data_ptr() != address and not outside.is_inference()
    outside.add_(1)  # writable outside inference mode


def test_small_and_non_cpu_requests_are_plain_tensors() -> None:
    assert scratch((4, 4), LIKE).shape == (4, 4) and pooled_bytes() == 0
    assert scratch(SHAPE, torch.empty(0, device="meta")).device.type == "meta"
    assert pooled_bytes() == 0


@pytest.mark.parametrize("mode", ["loop", "grouped_mm"])
def test_fused_experts_are_the_same_with_and_without_the_pool(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused experts take many scratch tensors in forward and backward (the grouped path once wrote a product
    into the buffer its token gather lived in): the results do not depend on whether memory is reused."""
    tokens, experts, hidden, inter, top_k = 256, 4, 64, 48, 2  # slot-sized tensors of >= 96 KiB: pooled
    x = torch.randn(tokens, hidden, requires_grad=True)
    gate_up = torch.randn(experts, 2 * inter, hidden, requires_grad=True)
    down = torch.randn(experts, hidden, inter, requires_grad=True)
    ids = torch.randint(0, experts, (tokens, top_k))
    weights = torch.rand(tokens, top_k, requires_grad=True)
    grad = torch.randn(tokens, hidden)
    results = []
    for limit in (256 * MIB, 0):
        monkeypatch.setattr(scratch_module, "POOL_BYTES", limit)
        release()
        for _ in range(2):  # the second run reuses the first run's buffers
            out = fused_experts(x, ids, weights, gate_up, down, mode)
            results.append([out, *torch.autograd.grad(out, (x, gate_up, down, weights), grad)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
