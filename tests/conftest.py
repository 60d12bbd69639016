"""Shared fixtures: tiny configurations that build in milliseconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

from hf_moe import MoEConfig
from hf_moe.kernels.cpu import gemm

# tokenizers' thread pool and forked workers (DDP tests) do not mix: keep it single-threaded in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(**overrides: object) -> MoEConfig:
    """A DeepSeek-V3-style MLA + sigmoid-router model small enough for unit tests."""
    fields: dict = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        first_k_dense_replace=1, n_group=4, topk_group=2, scoring_func="sigmoid", topk_method="noaux_tc",
        routed_scaling_factor=1.5, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    fields.update(overrides)
    return MoEConfig(**fields)


def tiny_gqa_config(**overrides: object) -> MoEConfig:
    """A Qwen/Mixtral-style GQA + softmax-router model."""
    fields: dict = dict(
        attention_type="gqa", num_key_value_heads=2, head_dim=8, scoring_func="softmax", topk_method="greedy",
        n_group=1, topk_group=1, q_lora_rank=None, routed_scaling_factor=1.0, qk_norm="head",
    )
    fields.update(overrides)
    return tiny_config(**fields)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


def onednn_for_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's size thresholds at zero, so that tiny test shapes take it too; skips where torch has no oneDNN."""
    if not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    monkeypatch.setattr(gemm, "MIN_ROWS", 1)
    monkeypatch.setattr(gemm, "MIN_MACS", 0)
    monkeypatch.setattr(gemm, "MIN_MACS_BUCKETED", 0)


@pytest.fixture(params=["aten", "onednn"])
def cpu_gemm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per fp32 CPU GEMM of `hf_moe.kernels.cpu.gemm`, whatever this machine's own choice: torch.mm,
    and oneDNN for every product size."""
    if request.param == "onednn":
        onednn_for_every_size(monkeypatch)
    with gemm.cpu_gemm_override(request.param) as choice:
        yield choice
