"""MoEForCausalLM end to end: Auto classes, save/load, generation with cache, training step, heads, dtypes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_moe import MoEConfig, MoEForCausalLM, MoEForSequenceClassification, MoEModel
from tests.conftest import tiny_config, tiny_gqa_config

CONFIGS = {
    "mla-sigmoid-groups": lambda: tiny_config(),
    "mla-no-qlora-mtp": lambda: tiny_config(q_lora_rank=None, num_nextn_predict_layers=1),
    "gqa-softmax-qknorm": lambda: tiny_gqa_config(),
    "gqa-shared-gate-full-qknorm": lambda: tiny_gqa_config(shared_expert_gate=True, qk_norm="full", clip_qkv=3.0,
                                                           attention_bias=True, tie_word_embeddings=True),
    "mixtral-style-sliding": lambda: tiny_gqa_config(topk_before_softmax=True, n_shared_experts=0, qk_norm=None,
                                                     first_k_dense_replace=0, sliding_window=4),
}


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (norm weights, biases, the balancing bias) so no term hides."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
            elif tensor.is_floating_point() and not name.endswith(("inv_freq", "tokens_per_expert")):
                tensor.copy_(torch.randn_like(tensor) * (0.2 if tensor.dim() > 1 else 1.0) + (tensor.dim() == 1))


@pytest.fixture(params=sorted(CONFIGS))
def model(request: pytest.FixtureRequest) -> MoEForCausalLM:
    model = MoEForCausalLM(CONFIGS[request.param]()).eval()
    randomize(model)
    return model


def test_auto_classes_resolve_to_ours() -> None:
    fields = {k: v for k, v in tiny_config().to_diff_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("hf_moe", **fields)
    assert isinstance(config, MoEConfig)
    assert type(AutoModel.from_config(config)) is MoEModel
    assert type(AutoModelForCausalLM.from_config(config)) is MoEForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is MoEForSequenceClassification


def test_save_and_reload_through_auto_gives_identical_logits(model: MoEForCausalLM, tmp_path) -> None:
    ids = torch.randint(3, 97, (2, 9))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is MoEForCausalLM
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_greedy_generate_with_and_without_cache_agree(model: MoEForCausalLM) -> None:
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding in the first row
    kwargs = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)


def test_incremental_decoding_matches_full_forward(model: MoEForCausalLM) -> None:
    ids = torch.randint(3, 97, (1, 8))
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    step = model(ids[:, 5:], cache=out.cache, use_cache=True)
    torch.testing.assert_close(step.logits, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_training_step_with_gradient_checkpointing_matches_without(model: MoEForCausalLM) -> None:
    ids = torch.randint(3, 97, (2, 10))
    model.train()
    model.config.router_jitter_noise = 0.0
    plain = model(ids, labels=ids)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    checkpointed = model(ids, labels=ids)
    checkpointed.loss.backward()
    torch.testing.assert_close(checkpointed.loss, plain.loss)
    assert grads, "no gradient reached any parameter"
    for name, grad in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-6, msg=name)


def test_reentrant_checkpointing_is_refused_with_a_clear_error() -> None:
    model = MoEForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_logits_to_keep_slices_the_last_positions(model: MoEForCausalLM) -> None:
    ids = torch.randint(3, 97, (2, 7))
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:])


def test_output_router_logits_and_hidden_states() -> None:
    config = tiny_config(aux_loss_alpha=0.01)
    model = MoEForCausalLM(config).eval()
    out = model(torch.randint(3, 97, (2, 5)), output_router_logits=True, output_hidden_states=True)
    assert len(out.router_logits) == len(config.moe_layer_indices) == 2
    assert out.router_logits[0].shape == (10, 8) and out.router_logits[0].dtype == torch.float32
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.aux_loss is not None and out.aux_loss > 0


def test_mtp_modules_cost_nothing_without_labels() -> None:
    model = MoEForCausalLM(tiny_config(num_nextn_predict_layers=2)).eval()
    calls = []
    model.mtp[0].register_forward_hook(lambda *_: calls.append(1))
    model(torch.randint(3, 97, (1, 6)))
    model.generate(torch.randint(3, 97, (1, 4)), max_new_tokens=3, do_sample=False)
    assert not calls
    model(torch.randint(3, 97, (1, 6)), labels=torch.randint(3, 97, (1, 6)))
    assert calls


def test_sequence_classification_uses_last_real_token() -> None:
    config = tiny_gqa_config(num_labels=3)
    model = MoEForSequenceClassification(config).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    logits = model(ids).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(model(ids[:1, :3]).logits, logits[:1])


def test_grouped_mm_backend_really_switches_and_matches_eager() -> None:
    model = MoEForCausalLM(tiny_config()).eval()
    randomize(model)
    ids = torch.randint(3, 97, (2, 6))
    eager = model(ids).logits
    model.set_experts_implementation("grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"
    calls = []
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    original = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    ALL_EXPERTS_FUNCTIONS["grouped_mm"] = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        grouped = model(ids).logits
    finally:
        ALL_EXPERTS_FUNCTIONS["grouped_mm"] = original
    assert calls, "the grouped_mm backend was not used"
    torch.testing.assert_close(grouped, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_config", [tiny_config, tiny_gqa_config, lambda: tiny_gqa_config(sliding_window=3)])
def test_attention_backends_agree_with_eager_under_padding(make_config) -> None:
    model = MoEForCausalLM(make_config()).eval()
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    outputs = {}
    with torch.no_grad():
        for implementation in ("eager", "sdpa"):
            model.set_attn_implementation(implementation)
            outputs[implementation] = model(ids, attention_mask=mask).logits
    for implementation in ("sdpa",):
        torch.testing.assert_close(outputs[implementation][1], outputs["eager"][1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outputs[implementation][0, 2:], outputs["eager"][0, 2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm", "hf_moe_fused"])
def test_bf16_autocast_runs_every_backend_close_to_fp32(backend: str) -> None:
    model = MoEForCausalLM(tiny_config()).eval()
    model.set_experts_implementation(backend)
    ids = torch.randint(3, 97, (1, 5))
    reference = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)


def test_save_pretrained_writes_a_card_only_through_the_model_card_hook(tmp_path) -> None:
    """`import hf_moe` registers the "model_card" hook; without it (remote code alone) no card is written."""
    from hf_moe.modeling import kernel_hooks

    model = MoEForCausalLM(tiny_config())
    hook = kernel_hooks.unregister_kernel("model_card")
    assert hook is not None
    try:
        model.save_pretrained(tmp_path / "bare")
    finally:
        kernel_hooks.register_kernel("model_card", hook)
    assert not (tmp_path / "bare" / "README.md").exists()
    assert (tmp_path / "bare" / "model.safetensors").is_file()
    model.save_pretrained(tmp_path / "carded")
    assert "mixture-of-experts" in (tmp_path / "carded" / "README.md").read_text()
