"""transformers' conventions that hf_moe's models follow (issue #13): config flags honoured like the keyword,
`return_dict=False` tuples, `shift_labels` in every loss term, reentrant checkpointing where nothing counts, no
MLA fields on GQA configs, and `output_loading_info` reporting instead of raising."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_moe import MoEConfig, MoEForCausalLM, MoEForSequenceClassification, MoEModel
from hf_moe.modeling.losses import IGNORE_INDEX
from tests.conftest import tiny_config, tiny_gqa_config

MLA_ONLY_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
IDS = torch.tensor([[5, 9, 14, 3, 22, 7], [8, 4, 31, 17, 6, 40]])


def eager(config: MoEConfig) -> MoEConfig:
    config._attn_implementation = "eager"  # attention weights exist only under eager (as in transformers)
    return config


@pytest.mark.parametrize("make", [tiny_config, tiny_gqa_config], ids=["mla", "gqa"])
def test_config_output_attentions_and_hidden_states_are_honoured(make: object) -> None:
    config = eager(make())
    config.output_attentions, config.output_hidden_states = True, True
    for model in (MoEModel(config).eval(), MoEForCausalLM(config).eval()):
        out = model(IDS)
        assert out.attentions is not None and len(out.attentions) == config.num_hidden_layers
        assert out.attentions[0].shape[:2] == (2, config.num_attention_heads)
        assert out.hidden_states is not None and len(out.hidden_states) == config.num_hidden_layers + 1
        assert model(IDS, output_attentions=False, output_hidden_states=False).attentions is None  # keyword wins


def test_return_dict_false_gives_a_tuple_and_config_return_dict_is_honoured() -> None:
    config = tiny_config()
    model = MoEModel(config).eval()
    as_dict = model(IDS, use_cache=False)
    as_tuple = model(IDS, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state)
    config.return_dict = False
    assert isinstance(model(IDS), tuple) and isinstance(MoEForCausalLM(config).eval()(IDS), tuple)
    assert not isinstance(model(IDS, return_dict=True), tuple)
    classifier = MoEForSequenceClassification(config).eval()  # transformers' generic head fails here
    logits = classifier(IDS)[0]
    assert logits.shape == (2, config.num_labels)
    torch.testing.assert_close(classifier(IDS, return_dict=True).logits, logits)


def test_use_cache_follows_the_config() -> None:
    config = tiny_config(use_cache=False)
    model = MoEForCausalLM(config).eval()
    assert model(IDS).cache is None
    assert model(IDS, use_cache=True).cache is not None
    config.use_cache = True
    assert model(IDS).cache is not None


def test_shift_labels_drive_the_lm_and_mtp_losses_like_labels() -> None:
    """`shift_labels` (targets already shifted, as context parallelism hands them) give the same loss terms as
    `labels`; targets only visible through shift_labels change the MTP loss (it used to read `labels` only)."""
    model = MoEForCausalLM(tiny_config(num_nextn_predict_layers=2, mtp_loss_weight=0.5, aux_loss_alpha=0.01))
    model.train()
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0
    shift = torch.cat([IDS[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    torch.manual_seed(0)
    plain = model(IDS, attention_mask=mask, labels=IDS, num_items_in_batch=torch.tensor(9))
    torch.manual_seed(0)
    shifted = model(IDS, attention_mask=mask, labels=IDS, shift_labels=shift, num_items_in_batch=torch.tensor(9))
    for name in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
        torch.testing.assert_close(getattr(shifted, name), getattr(plain, name), msg=name)
    other = shift.clone()
    other[0, 2:4] = torch.tensor([60, 61])  # targets that differ from labels: every term must see them
    changed = model(IDS, attention_mask=mask, labels=IDS, shift_labels=other, num_items_in_batch=torch.tensor(9))
    assert not torch.allclose(changed.lm_loss, plain.lm_loss)
    assert not torch.allclose(changed.mtp_loss, plain.mtp_loss)


def test_reentrant_checkpointing_is_allowed_without_bias_balancing() -> None:
    model = MoEForCausalLM(tiny_config(router_bias_update_rate=0.0)).train()
    plain = model(IDS, labels=IDS)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed = model(IDS, labels=IDS)
    checkpointed.loss.backward()
    torch.testing.assert_close(checkpointed.loss, plain.loss)
    for name, grad in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-6, msg=name)
    dense = MoEForCausalLM(tiny_config(n_routed_experts=0, first_k_dense_replace=0, num_experts_per_tok=1,
                                       n_group=1, topk_group=1, topk_method="greedy"))
    dense.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # no router


def test_reentrant_checkpointing_is_refused_with_its_reason_where_loads_are_counted() -> None:
    model = MoEForCausalLM(tiny_config(router_bias_update_rate=1e-3))
    with pytest.raises(ValueError, match="router_bias_update_rate=0.001.*count no token"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_gqa_configs_carry_no_mla_fields_and_mla_configs_no_gqa_fields(tmp_path) -> None:
    gqa = tiny_gqa_config(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8)  # given, yet meaningless here
    assert all(getattr(gqa, field) is None for field in MLA_ONLY_FIELDS)
    gqa.save_pretrained(tmp_path)
    assert all(getattr(MoEConfig.from_pretrained(tmp_path), field) is None for field in MLA_ONLY_FIELDS)
    model = MoEForCausalLM(gqa).eval()
    assert model.generate(IDS[:1], max_new_tokens=2, do_sample=False).shape == (1, 8)
    gqa.kv_lora_rank = 16
    with pytest.raises(ValueError, match="kv_lora_rank=16 is invalid: only used with attention_type='mla'"):
        gqa.validate_moe()
    mla = MoEConfig()
    assert (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.qk_nope_head_dim, mla.v_head_dim) == (256, 32, 64, 64)
    assert (mla.qk_norm, mla.clip_qkv, mla.sliding_window) == (None, None, None)
    with pytest.raises(ValueError, match="sliding_window"):
        tiny_config(sliding_window=4)


def test_output_loading_info_reports_instead_of_raising(tmp_path) -> None:
    MoEForCausalLM(tiny_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm.weight"]
    weights["model.stray"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="Missing weights: model.norm.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)  # strict stays the default for one's own checkpoint
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is MoEForCausalLM
    assert info["missing_keys"] == {"model.norm.weight"} and info["unexpected_keys"] == {"model.stray"}
    with pytest.raises(RuntimeError, match="Unexpected weights: model.stray"):
        MoEForCausalLM.from_pretrained(tmp_path, output_loading_info=True, strict=True)
