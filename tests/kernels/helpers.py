"""Helpers shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch


def spy_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, calls: list[int] | None = None) -> list[int]:
    """Counts the calls of owner.name (appending to `calls` when given)."""
    calls = [] if calls is None else calls
    original = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def grads(output: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(output, inputs, grad)


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)
