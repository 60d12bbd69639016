"""Upcycling dense checkpoints: the recipes, their layout and exactness, the probe, the recipe as keywords.

The oracle of every dense family (copy, fine-grained and fine-grained + shared recipes under softmax and
sigmoid routers: same fp32 logits as transformers' own class) is in tests/conversion/families/test_oracles.py;
here: tiny checkpoints of those families' oracle cases. Recipes that cannot be exact must say so and really
differ (so the comparison can fail).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

import hf_moe
from hf_moe.conversion.checkpoint_io import CheckpointError
from hf_moe.conversion.records import DenseFamily
from hf_moe.conversion.upcycle import upcycle_model
from hf_moe.conversion.upcycle_recipe import TIE_BREAK, UpcycleRecipe, neuron_partition, router_rows
from hf_moe.modeling.routing import Router
from tests.conversion.families import oracle
from tests.conversion.families.oracle import TOL, max_logit_diff, probe_ids
from tests.conversion.families.oracle import randomise_dense as randomise

FAMILIES = oracle.cases(DenseFamily)  # llama, mistral, qwen2, qwen3: each dense record's oracle case


def dense_checkpoint(folder: Path, family: str, **overrides: object) -> PreTrainedModel:
    return oracle.dense_checkpoint(folder, FAMILIES[family], **overrides)


def test_inexact_recipe_is_reported_and_differs(tmp_path: Path) -> None:
    """top_k not a multiple of the routed shards: partial copies. The report says why and measures a real gap."""
    model = dense_checkpoint(tmp_path / "dense", "qwen3")
    report = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=8, top_k=3, granularity=4,
                            progress=False)  # fmt: skip
    diff, _ = max_logit_diff(model, tmp_path / "moe")
    assert diff > 0.1 and report.max_abs_logit_diff > 0.1
    assert not report.expected_exact and not report.exact
    assert "top_k=3 is not a multiple of the 4 routed shards" in report.why_not_exact[0]
    assert "NOT exact" in str(report)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_zero_router_ties_pick_whole_copies(tmp_path: Path, scoring: str) -> None:
    """A zero router scores every expert alike; torch.topk breaks ties arbitrarily, so a per-copy bias orders copies."""
    model = dense_checkpoint(tmp_path / "dense", "llama")
    report = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=16, top_k=4, granularity=4,
                            router_init="zero", scoring_func=scoring, progress=False)  # fmt: skip
    diff, _ = max_logit_diff(model, tmp_path / "moe")
    assert diff < TOL and report.exact
    tensors = load_file(tmp_path / "moe" / "model.safetensors")
    assert torch.equal(tensors["model.layers.0.mlp.gate.weight"], torch.zeros(16, 32))
    bias = tensors["model.layers.0.mlp.gate.e_score_correction_bias"]
    assert torch.equal(bias, -TIE_BREAK * (torch.arange(16) // 4).float())


def test_router_picks_whole_copies_on_many_tokens() -> None:
    """Router level: identical rows within a copy + the tie-break bias -> every token's top-k is whole copies."""
    for init in ("zero", "random"):
        recipe = UpcycleRecipe(num_experts=32, top_k=8, granularity=4, router_init=init)
        weight, bias = router_rows(recipe, hidden_size=16, std=0.02, layer=0)
        config = hf_moe.MoEConfig(attention_type="gqa", hidden_size=16, num_attention_heads=2, n_routed_experts=32,
                                  num_experts_per_tok=8, scoring_func="sigmoid", topk_method="noaux_tc")  # fmt: skip
        router = Router(config).eval()
        with torch.no_grad():
            router.weight.copy_(weight)
            router.e_score_correction_bias.copy_(bias)
        routing = router(torch.randn(500, 16))
        copies = (routing.topk_ids // 4).sort(dim=-1).values  # (T, 8): each copy appears exactly 4 times
        assert torch.equal(copies.view(500, 2, 4), copies.view(500, 2, 4)[..., :1].expand(-1, -1, 4))
        assert (copies[:, 0] != copies[:, 4]).all()


def test_group_limited_routing_aligned_and_misaligned(tmp_path: Path) -> None:
    model = dense_checkpoint(tmp_path / "dense", "qwen2")
    aligned = hf_moe.upcycle(tmp_path / "dense", tmp_path / "a", num_experts=8, top_k=2, granularity=2, n_group=2,
                             topk_group=1, scoring_func="sigmoid", progress=False)  # fmt: skip
    assert aligned.exact and max_logit_diff(model, tmp_path / "a")[0] < TOL
    assert json.loads((tmp_path / "a" / "config.json").read_text())["topk_method"] == "noaux_tc"
    split = hf_moe.upcycle(tmp_path / "dense", tmp_path / "b", num_experts=8, top_k=4, granularity=4, n_group=4,
                           topk_group=2, scoring_func="sigmoid", progress=False)  # fmt: skip
    assert not split.expected_exact and "n_group=4" in split.why_not_exact[0]


def test_dense_layers_kept_and_moe_layer_freq(tmp_path: Path) -> None:
    model = dense_checkpoint(tmp_path / "dense", "llama", num_hidden_layers=4)
    report = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, granularity=2,
                            first_k_dense_replace=1, moe_layer_freq=2, progress=False)  # fmt: skip
    assert report.exact and max_logit_diff(model, tmp_path / "moe")[0] < TOL
    config = hf_moe.MoEConfig.from_pretrained(tmp_path / "moe")
    assert config.moe_layer_indices == [1, 3]
    out = load_file(tmp_path / "moe" / "model.safetensors")
    dense_state = model.state_dict()
    for layer in (0, 2):  # dense layers copied verbatim
        for part in ("gate", "up", "down"):
            key = f"model.layers.{layer}.mlp.{part}_proj.weight"
            assert torch.equal(out[key], dense_state[key])
    assert "model.layers.1.mlp.experts.gate_up_proj" in out and "model.layers.2.mlp.gate.weight" not in out


def test_expert_layout_and_scale(tmp_path: Path) -> None:
    """Expert j = shard (j mod R) of copy j // R; down_proj x R, or raw slices with routed_scaling_factor = R."""
    model = dense_checkpoint(tmp_path / "dense", "llama")
    gate = model.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    down = model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    kwargs = dict(num_experts=6, top_k=3, granularity=4, shared_experts=1, progress=False)  # I = 12, R = 3
    hf_moe.upcycle(tmp_path / "dense", tmp_path / "a", **kwargs)
    b = hf_moe.upcycle(tmp_path / "dense", tmp_path / "b", scale_on="routed_scaling_factor", **kwargs)
    assert b.exact
    for name, scale in (("a", 3.0), ("b", 1.0)):
        out = load_file(tmp_path / name / "model.safetensors")
        assert torch.equal(out["model.layers.0.mlp.shared_experts.gate_proj.weight"], gate[:12])
        for j in range(6):
            shard = slice(12 * (1 + j % 3), 12 * (2 + j % 3))
            assert torch.equal(out["model.layers.0.mlp.experts.gate_up_proj"][j, :12], gate[shard])
            torch.testing.assert_close(out["model.layers.0.mlp.experts.down_proj"][j], down[:, shard] * scale)
    config_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config_b["routed_scaling_factor"] == 3.0 and config_b["moe_intermediate_size"] == 12


def test_shared_expert_gate_and_active_selection(tmp_path: Path) -> None:
    model = dense_checkpoint(tmp_path / "dense", "qwen2")
    report = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, granularity=4,
                            shared_experts=2, shared_expert_gate=True, shared_selection="active",
                            probe_input_ids=probe_ids(length=20), progress=False)  # fmt: skip
    assert report.exact and max_logit_diff(model, tmp_path / "moe")[0] < TOL
    out = load_file(tmp_path / "moe" / "model.safetensors")
    assert torch.equal(out["model.layers.0.mlp.shared_expert_gate.weight"], torch.zeros(1, 32))
    shared_rows = out["model.layers.0.mlp.shared_experts.gate_proj.weight"]
    gate = model.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    assert not torch.equal(shared_rows, gate[:24])  # the most active neurons, not simply the first shards


def test_neuron_partition_is_a_permutation() -> None:
    recipe = UpcycleRecipe(num_experts=4, top_k=2, granularity=4, shared_experts=2, shared_selection="active")
    activity = torch.rand(48)
    shared, routed = neuron_partition(48, recipe, activity)
    assert torch.equal(torch.cat((shared, routed)).sort().values, torch.arange(48))
    assert set(shared.tolist()) == set(activity.topk(24).indices.tolist())


def test_hidden_router_init(tmp_path: Path) -> None:
    model = dense_checkpoint(tmp_path / "dense", "mistral")
    sequences = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14], [15, 16]]  # ragged: right-padded, last tokens used
    report = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, granularity=2,
                            router_init="hidden", probe_input_ids=sequences, progress=False)  # fmt: skip
    assert report.exact and max_logit_diff(model, tmp_path / "moe")[0] < TOL
    weight = load_file(tmp_path / "moe" / "model.safetensors")["model.layers.1.mlp.gate.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight[0], weight[1]) and torch.equal(weight[2], weight[3])
    assert not torch.allclose(weight[0], weight[2])
    torch.testing.assert_close(weight.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="router_init='hidden' is invalid"):
        hf_moe.upcycle(tmp_path / "dense", tmp_path / "x", num_experts=4, top_k=2, router_init="hidden",
                       probe_input_ids=sequences[:3], progress=False)  # fmt: skip


def test_probe_texts_with_tokenizer(tmp_path: Path) -> None:
    """probe_texts go through the source's tokenizer (hidden router init from text); tokenizer files are copied."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dense_checkpoint(tmp_path / "dense", "llama")
    words = ["<pad>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "dog", "ran", "code", "runs", "[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>").save_pretrained(tmp_path / "dense")
    texts = ["the cat sat on the mat", "the dog ran", "code runs", "the mat"]
    report = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=1, router_init="hidden",
                            probe_texts=texts, progress=False)  # fmt: skip
    assert report.exact and report.probe_tokens == 13
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(report.extra["side_files"])
    assert (tmp_path / "moe" / "tokenizer.json").is_file()


def test_drop_upcycling_redraws_the_requested_fraction(tmp_path: Path) -> None:
    model = dense_checkpoint(tmp_path / "dense", "llama")
    report = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, drop_ratio=0.5,
                            progress=False)  # fmt: skip
    assert report.recipe["strategy"] == "drop-upcycling" and not report.expected_exact
    assert "Drop-Upcycling" in report.why_not_exact[0] and report.max_abs_logit_diff > 1e-3
    gate = model.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    experts = load_file(tmp_path / "moe" / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj"]
    changed = [(experts[j, :48] != gate).any(dim=1) for j in range(4)]
    assert all(int(c.sum()) == 24 for c in changed)  # half of each expert's neurons re-drawn
    assert not torch.equal(changed[0], changed[1])  # independently per expert


def test_config_records_attention_and_recipe(tmp_path: Path) -> None:
    for family, checks in {
        "llama": dict(attention_bias=True, attention_out_bias=True, tie_word_embeddings=True, qk_norm=None),
        "mistral": dict(sliding_window=5, head_dim=16, attention_bias=False),
        "qwen2": dict(attention_bias=True, attention_out_bias=False),
        "qwen3": dict(qk_norm="head", head_dim=16),
    }.items():
        dense_checkpoint(tmp_path / family, family)
        hf_moe.upcycle(tmp_path / family, tmp_path / f"{family}-moe", num_experts=2, top_k=1, probe=False,
                       progress=False)  # fmt: skip
        config = hf_moe.MoEConfig.from_pretrained(tmp_path / f"{family}-moe")
        assert config.attention_type == "gqa" and config.router_bias_update_rate == 1e-3
        assert config.bos_token_id == 1 and config.eos_token_id == 2 and config.vocab_size == 80
        for name, value in checks.items():
            assert getattr(config, name) == value, (family, name)
        assert config.upcycled_from["strategy"] == "copy"
        assert config.upcycled_from["base_model"] == str((tmp_path / family).resolve())  # a local path
        assert config.upcycled_from["function_preservation"]["max_abs_logit_diff"] is None  # probe=False
    assert hf_moe.MoEConfig.from_pretrained(tmp_path / "llama-moe").rope_parameters["rope_type"] == "llama3"


def test_base_model_from_hub_cache_folder_and_override(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "abc123"
    dense_checkpoint(snapshot, "llama")
    report = hf_moe.upcycle(snapshot, tmp_path / "a", num_experts=2, top_k=1, strategy=None, probe=False,
                            progress=False)  # fmt: skip
    assert report.base_model == "org/tiny-llama" and report.recipe["strategy"] == "copy"
    named = hf_moe.upcycle(snapshot, tmp_path / "b", num_experts=2, top_k=1, base_model="me/dense", probe=False,
                           progress=False)  # fmt: skip
    assert hf_moe.MoEConfig.from_pretrained(tmp_path / "b").upcycled_from["base_model"] == named.base_model == "me/dense"


def test_in_memory_upcycle_model() -> None:
    dense = randomise(AutoModelForCausalLM.from_config(FAMILIES["qwen3"].config()))
    moe = upcycle_model(dense, num_experts=6, top_k=4, granularity=3, shared_experts=1, scoring_func="softmax")
    ids = probe_ids()
    with torch.no_grad():
        diff = (dense(ids).logits - moe(ids).logits).abs().max().item()
    assert diff < TOL and moe.upcycle_report.exact
    assert moe.model.layers[0].mlp.gate.weight.dtype == torch.float32


def test_bfloat16_down_proj_rounding_is_reported(tmp_path: Path) -> None:
    dense_checkpoint(tmp_path / "dense", "llama").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    kwargs = dict(num_experts=6, top_k=3, granularity=4, shared_experts=1, progress=False)  # R = 3
    rounded = hf_moe.upcycle(tmp_path / "bf16", tmp_path / "a", **kwargs)
    assert any("rounds in torch.bfloat16" in why for why in rounded.why_not_exact)
    exact = hf_moe.upcycle(tmp_path / "bf16", tmp_path / "b", scale_on="routed_scaling_factor", **kwargs)
    assert exact.exact, exact
    out = load_file(tmp_path / "b" / "model.safetensors")
    assert out["model.layers.0.mlp.experts.down_proj"].dtype == torch.bfloat16
    assert out["model.layers.0.mlp.gate.weight"].dtype == torch.float32


# --------------------------------------------------------------------------------------------- bad inputs
BAD_RECIPES = [
    (dict(num_experts=4, top_k=2, granularity=5), "granularity=5 is invalid: must divide"),
    (dict(num_experts=4, top_k=2, granularity=2, shared_experts=2), "shared_experts=2 is invalid"),
    (dict(num_experts=5, top_k=2, granularity=2), "num_experts=5 is invalid: must be a multiple of the 2"),
    (dict(num_experts=4, top_k=5), "top_k=5 is invalid"),
    (dict(num_experts=8, top_k=2, granularity=4, strategy="copy"), "strategy='copy' is invalid"),
    (dict(num_experts=4, top_k=2, strategy="drop-upcycling"), "drop_ratio=0.0 is invalid"),
    (dict(num_experts=4, top_k=2, drop_ratio=1.5), "drop_ratio=1.5 is invalid"),
    (dict(num_experts=4, top_k=2, router_init="hidden"), "router_init='hidden' is invalid"),
    (dict(num_experts=4, top_k=2, scoring_func="relu"), "scoring_func='relu' is invalid"),
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    dense_checkpoint(folder, "llama")
    return folder


@pytest.mark.parametrize(("kwargs", "message"), BAD_RECIPES, ids=[m.split(" is")[0] for _, m in BAD_RECIPES])
def test_impossible_recipes_raise_clear_errors(llama_dir: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf_moe.upcycle(llama_dir, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_unsupported_sources_raise_clear_errors(tmp_path: Path) -> None:
    dense_checkpoint(tmp_path / "mlp_bias", "llama", mlp_bias=True)
    with pytest.raises(ValueError, match="mlp_bias=True"):
        hf_moe.upcycle(tmp_path / "mlp_bias", tmp_path / "o1", num_experts=2, top_k=1, progress=False)
    dense_checkpoint(tmp_path / "mixed", "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="layer_types=.*mixes sliding and full attention"):
        hf_moe.upcycle(tmp_path / "mixed", tmp_path / "o2", num_experts=2, top_k=1, progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2'.*supported dense families"):
        hf_moe.upcycle(tmp_path / "gpt2", tmp_path / "o3", num_experts=2, top_k=1, progress=False)
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    save_file({"x": torch.zeros(1)}, tmp_path / "weird" / "model.safetensors")
    with pytest.raises(ValueError, match="unknown architecture model_type='no_such_arch'"):
        hf_moe.upcycle(tmp_path / "weird", tmp_path / "o4", num_experts=2, top_k=1, progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_shape_mismatch_and_missing_tensors(tmp_path: Path) -> None:
    dense_checkpoint(tmp_path / "dense", "llama")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    (tmp_path / "dense" / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"Shape mismatch for 'model.layers.0.mlp.gate_proj.weight'.*\(64, 32\)"):
        hf_moe.upcycle(tmp_path / "dense", tmp_path / "o1", num_experts=2, top_k=1, progress=False)
    (tmp_path / "dense" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="lacks 13 tensors"):
        hf_moe.upcycle(tmp_path / "dense", tmp_path / "o2", num_experts=2, top_k=1, progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_llama_model_object_is_accepted_in_memory_with_tied_head() -> None:
    dense = randomise(LlamaForCausalLM(FAMILIES["llama"].config()))
    moe = upcycle_model(dense, num_experts=4, top_k=2, probe=False)
    assert moe.upcycle_report.max_abs_logit_diff is None
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    ids = probe_ids()
    with torch.no_grad():
        assert (dense(ids).logits - moe(ids).logits).abs().max().item() < TOL


# ------------------------------------------------------------------------------------- the recipe argument
def test_recipe_object_and_keywords_are_one_spelling(llama_dir: Path, tmp_path: Path) -> None:
    recipe = UpcycleRecipe(num_experts=8, top_k=4, granularity=4, router_init="zero")
    by_object = hf_moe.upcycle(llama_dir, tmp_path / "a", recipe, probe=False, progress=False)
    by_keywords = hf_moe.upcycle(llama_dir, tmp_path / "b", num_experts=8, top_k=4, granularity=4, router_init="zero",
                                 probe=False, progress=False)  # fmt: skip
    overridden = hf_moe.upcycle(llama_dir, tmp_path / "c", UpcycleRecipe(num_experts=2, top_k=1), num_experts=8,
                                top_k=4, granularity=4, router_init="zero", probe=False, progress=False)  # fmt: skip
    assert by_object.recipe == by_keywords.recipe == overridden.recipe
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_unknown_or_missing_recipe_keywords_are_named(llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'num_expert' \(did you mean 'num_experts'\?\)"):
        hf_moe.upcycle(llama_dir, tmp_path / "out", num_expert=4, top_k=2, progress=False)
    with pytest.raises(TypeError, match="upcycle needs top_k"):
        hf_moe.upcycle(llama_dir, tmp_path / "out", num_experts=4, progress=False)
    with pytest.raises(TypeError, match="'router' .*the recipe fields are"):
        upcycle_model(AutoModelForCausalLM.from_config(FAMILIES["llama"].config()), num_experts=4, top_k=2,
                      router="zero")  # fmt: skip
    assert not (tmp_path / "out").exists()
