"""A tiny end-to-end `run_pretraining` (the function behind examples/pretrain_mtp.py and `hf-moe demo`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe import MoEForCausalLM
from hf_moe.demo.recipe import run_pretraining


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_run_pretraining_end_to_end(tmp_path) -> None:
    lines: list[str] = []
    result = run_pretraining(
        tmp_path, max_steps=4, corpus_bytes=120_000, vocab_size=512, block_size=32, batch_size=4, eval_batches=1,
        logging_steps=2, acceptance_prompts=1, print_fn=lines.append,
        config_overrides=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, n_routed_experts=8,
                              q_lora_rank=None, kv_lora_rank=32),
    )
    assert isinstance(result.model, MoEForCausalLM) and result.model.mtp is not None
    for key in ("train_loss", "eval_loss", "eval_max_vio", "train_max_vio_first", "mtp_acceptance",
                "mtp_tokens_per_forward"):
        assert key in result.metrics and result.metrics[key] == result.metrics[key], key  # present, not NaN
    assert [entry["step"] for entry in result.callback.history] == [1, 2, 3, 4]
    assert sum("MaxVio" in line and "mtp" in line for line in lines) == 2  # one line per log (steps 2 and 4)
    assert any("drafts accepted" in line for line in lines)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["eval_loss"] == pytest.approx(result.metrics["eval_loss"]) and "layer_1" in saved["eval_expert_load"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert torch.equal(reloaded.model.layers[1].mlp.gate.e_score_correction_bias,
                       result.model.model.layers[1].mlp.gate.e_score_correction_bias)
    assert tokenizer.decode(tokenizer("x = 1")["input_ids"]) == "x = 1"
