"""Any model hf_moe loads: hf_moe folders (upcycled ones too), MoE families converted in memory (routing equal
to transformers' own router), and one-line refusals for what is not an MoE model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from hf_moe.analysis import (
    ModelLoadError,
    TokenSequence,
    checkpoint_step,
    load_moe_config,
    load_moe_model,
    trace_routing,
)
from hf_moe.conversion.upcycle import upcycle

from ..conversion.families.oracle import cases, family_model
from ..conversion.test_upcycle import dense_checkpoint


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v3_qlora_yarn"])
def test_family_folder_is_converted_in_memory_with_the_same_routing(case: str, tmp_path) -> None:
    reference, config = family_model(cases()[case])
    reference.save_pretrained(tmp_path / case)
    files = sorted(p.name for p in (tmp_path / case).iterdir())
    loaded = load_moe_model(tmp_path / case)
    assert loaded.source == config.model_type and sorted(p.name for p in (tmp_path / case).iterdir()) == files
    ids = torch.randint(3, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    trace = trace_routing(loaded.model, [TokenSequence(0, row) for row in ids], progress=False)
    with torch.no_grad():
        expected = reference(ids, output_router_logits=True)
        torch.testing.assert_close(loaded.model(ids).logits, expected.logits, rtol=1e-5, atol=1e-5)
    if case == "deepseek_v3_qlora_yarn":
        return  # biased, group-limited choice: not the plain top-k of the logits transformers returns
    assert len(expected.router_logits) == len(trace.layers)  # one (B*T, N) per MoE layer
    for layer, logits in enumerate(expected.router_logits):
        assert torch.equal(trace.expert_sets(layer), logits.topk(trace.top_k, dim=-1).indices.sort(dim=-1).values)


def test_upcycled_model_is_an_hf_moe_folder(tmp_path) -> None:
    dense_checkpoint(tmp_path / "dense", "llama")
    upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, probe=False)
    loaded = load_moe_model(tmp_path / "moe")
    assert loaded.source == "hf_moe" and loaded.config.n_routed_experts == 4 and not loaded.model.training


def test_what_is_not_an_moe_model_is_refused_in_one_line(tmp_path) -> None:
    LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    cases = {"llama": "dense llama model, not an MoE model", "bert": "model_type='bert', not an MoE model",
             "bad": "cannot be read as JSON", "empty": "no config.json", "nowhere": "does not exist"}
    for name, message in cases.items():
        for load in (load_moe_model, load_moe_config):
            with pytest.raises(ModelLoadError, match=message) as error:
                load(tmp_path / name)
            assert "\n" not in str(error.value)


def test_hf_moe_folder_without_weights_is_a_clear_error(tmp_path) -> None:
    from ..conftest import tiny_config

    tiny_config().save_pretrained(tmp_path / "cfg")
    with pytest.raises(ModelLoadError, match="cannot load .*cfg"):
        load_moe_model(tmp_path / "cfg")


def test_checkpoint_step_from_name_or_trainer_state(tmp_path) -> None:
    assert checkpoint_step(tmp_path / "checkpoint-250") == 250
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text('{"global_step": 40}')
    assert checkpoint_step(tmp_path / "run") == 40
    assert checkpoint_step(tmp_path / "other") is None
