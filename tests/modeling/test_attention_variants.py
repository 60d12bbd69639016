"""The attention-side knobs on their own (the family oracles in tests/conversion/families hold them to
transformers' classes): partial rotary, per-layer attention types (sliding, chunked), NoPE layers, q/k norm
variants (Llama 4's: on the rotating layers only), attention temperature tuning, muP multipliers, post-sub-layer
norms, MLA's latent norm epsilon; each validated with the field named, and the rope kernel on a partial rotary
width."""

from __future__ import annotations

import pytest
import torch

from hf_moe import MoEConfig, MoEForCausalLM
from hf_moe.modeling.attention import GroupedQueryAttention, WeightlessRMSNorm, temperature_scales
from hf_moe.modeling.configuration import ConfigFieldError
from hf_moe.modeling.kernel_hooks import get_kernel, register_kernel, unregister_kernel
from hf_moe.modeling.rotary import RotaryEmbedding, apply_rope
from tests.conftest import tiny_config, tiny_gqa_config

FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"


def model_of(**fields: object) -> MoEForCausalLM:
    torch.manual_seed(0)
    config = tiny_gqa_config(**fields)
    config._attn_implementation = "eager"
    model = MoEForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
    return model


def logits(model: MoEForCausalLM, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


IDS = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------ partial rotary
def test_partial_rotary_rotates_only_the_first_dims() -> None:
    config = tiny_gqa_config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                           "partial_rotary_factor": 0.5})  # fmt: skip
    assert config.rotary_dim == 8
    x = torch.randn(2, 4, 6, 16)
    cos, sin = RotaryEmbedding(config)(x, torch.arange(6)[None].expand(2, -1))
    assert cos.shape[-1] == 8
    out = apply_rope(x, cos, sin, False)
    assert torch.equal(out[..., 8:], x[..., 8:])  # the rest of the head carries no position
    assert not torch.allclose(out[..., :8], x[..., :8])
    assert torch.allclose(out[..., :8], apply_rope(x[..., :8].contiguous(), cos, sin, False))


def test_partial_rotary_with_the_rope_kernel_matches_the_reference() -> None:
    """The "rope" kernel (training calls) runs on the rotated part only; forward and backward as the reference."""
    import hf_moe  # noqa: F401  (registers the kernels)

    x = torch.randn(2, 4, 6, 16, requires_grad=True)
    config = tiny_gqa_config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                           "partial_rotary_factor": 0.25})  # fmt: skip
    cos, sin = RotaryEmbedding(config)(x, torch.arange(6)[None].expand(2, -1))
    grad = torch.randn(2, 4, 6, 16)
    assert get_kernel("rope") is not None
    fast = apply_rope(x, cos, sin, False)
    (fast_grad,) = torch.autograd.grad(fast, x, grad)
    kernel = unregister_kernel("rope")
    try:
        ref = apply_rope(x, cos, sin, False)
        (ref_grad,) = torch.autograd.grad(ref, x, grad)
    finally:
        register_kernel("rope", kernel)
    assert torch.allclose(fast, ref, atol=1e-6) and torch.allclose(fast_grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize("factor", [0.2, 0.05])  # rotary widths 3 (odd) and 0
def test_partial_rotary_width_must_be_even_and_positive(factor: float) -> None:
    with pytest.raises(ConfigFieldError, match="rope_parameters"):
        tiny_gqa_config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                      "partial_rotary_factor": factor})  # fmt: skip


def test_mla_refuses_partial_rotary() -> None:
    with pytest.raises(ConfigFieldError, match="rope_parameters"):
        tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})


# ------------------------------------------------------------------------------------ per-layer types
def test_sliding_layers_see_only_their_window() -> None:
    """One sliding layer with window 3: position 11 does not depend on token 5 (outside the window); a full layer
    does. The model builds one mask per type."""
    fields = dict(num_hidden_layers=1, first_k_dense_replace=1, sliding_window=3)
    changed = IDS.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 97
    sliding = model_of(**fields, layer_types=[SLIDING])
    assert torch.equal(logits(sliding, IDS)[:, -1], logits(sliding, changed)[:, -1])
    full = model_of(**fields, layer_types=[FULL])
    assert not torch.allclose(logits(full, IDS)[:, -1], logits(full, changed)[:, -1])
    masks = full.model.attention_mask_for(full.model.embed_tokens(IDS), None, None, torch.arange(12)[None])
    assert isinstance(masks, dict) and set(masks) == {FULL}


def test_chunked_layers_see_only_their_chunk() -> None:
    fields = dict(num_hidden_layers=1, first_k_dense_replace=1, attention_chunk_size=4, layer_types=[CHUNKED])
    model = model_of(**fields)
    changed = IDS.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97  # chunk [4, 8)
    before, after = logits(model, IDS), logits(model, changed)
    assert torch.equal(before[:, 8:], after[:, 8:])  # the next chunk does not see it
    assert not torch.allclose(before[:, 7], after[:, 7])


@pytest.mark.parametrize("layer_types", [[FULL, SLIDING, FULL], [CHUNKED, FULL, CHUNKED], [CHUNKED, SLIDING, FULL]])
def test_mixed_layers_generate_with_the_cache_as_without(layer_types: list[str]) -> None:
    """Sliding and chunked layers together: each mask is sized by a cache layer of its own type."""
    model = model_of(layer_types=layer_types, sliding_window=3, attention_chunk_size=4)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids=IDS[:, :6], use_cache=True, **settings)
        uncached = model.generate(input_ids=IDS[:, :6], use_cache=False, **settings)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("layer_types", [None, [FULL, SLIDING, FULL]])
def test_static_cache_generation_with_layer_types(layer_types: list[str] | None) -> None:
    """generate() with a static cache precomputes masks (`create_masks_for_generate`): one type or several."""
    model = model_of(layer_types=layer_types, sliding_window=4 if layer_types else None)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        static = model.generate(input_ids=IDS[:, :6], cache_implementation="static", **settings)
        dynamic = model.generate(input_ids=IDS[:, :6], **settings)
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize(("fields", "field"), [
    (dict(layer_types=[FULL, FULL]), "layer_types"),                      # one per layer
    (dict(layer_types=[FULL, SLIDING, FULL]), "layer_types"),             # needs sliding_window
    (dict(layer_types=[CHUNKED, FULL, FULL]), "layer_types"),             # needs attention_chunk_size
    (dict(layer_types=[FULL, "linear_attention", FULL]), "layer_types"),  # not one of ours
    (dict(nope_layers=[0, 0]), "nope_layers"),
    (dict(nope_layers=[3]), "nope_layers"),
    (dict(qk_norm=None, qk_norm_after_rope=True), "qk_norm_after_rope"),
    (dict(qk_norm=None, qk_norm_weight=False), "qk_norm_weight"),
    (dict(qk_norm=None, qk_norm_skip_nope=True), "qk_norm_skip_nope"),
    (dict(attention_temperature_scale=0.0), "attention_temperature_scale"),
    (dict(attention_temperature_scale=float("nan")), "attention_temperature_scale"),
    (dict(attention_temperature_floor=0), "attention_temperature_floor"),
    (dict(latent_norm_eps=1e-6), "latent_norm_eps"),                      # MLA only
    (dict(sublayer_norm="peri"), "sublayer_norm"),
    (dict(embedding_multiplier=0.0), "embedding_multiplier"),
    (dict(logits_scaling=float("inf")), "logits_scaling"),
])  # fmt: skip
def test_invalid_knobs_name_their_field(fields: dict, field: str) -> None:
    with pytest.raises(ConfigFieldError, match=field):
        tiny_gqa_config(**fields)


@pytest.mark.parametrize("field", ["layer_types", "nope_layers", "attention_chunk_size", "attention_temperature_scale"])
def test_mla_refuses_per_layer_gqa_knobs(field: str) -> None:
    value = {"layer_types": [FULL] * 3, "nope_layers": [1], "attention_chunk_size": 4,
             "attention_temperature_scale": 0.1}[field]  # fmt: skip
    with pytest.raises(ConfigFieldError, match=field):
        tiny_config(**{field: value})


# ------------------------------------------------------------------------------------------------- NoPE
def test_nope_layers_ignore_positions() -> None:
    """Every layer NoPE: the RoPE base does not matter; with RoPE on some layer it does."""
    other_base = {"rope_type": "default", "rope_theta": 3.0}
    nope, nope_other = model_of(nope_layers=[0, 1, 2]), model_of(nope_layers=[0, 1, 2], rope_parameters=other_base)
    assert [layer.self_attn.use_rope for layer in nope.model.layers] == [False] * 3
    assert torch.equal(logits(nope, IDS), logits(nope_other, IDS))
    rope, rope_other = model_of(nope_layers=[1]), model_of(nope_layers=[1], rope_parameters=other_base)
    assert not torch.allclose(logits(rope, IDS), logits(rope_other, IDS), atol=1e-4)


# -------------------------------------------------------------------------------------- q/k norm variants
def test_weightless_qk_norm_is_rmsnorm_without_a_weight() -> None:
    attention = GroupedQueryAttention(tiny_gqa_config(qk_norm="head", qk_norm_weight=False), 0)
    assert isinstance(attention.q_norm, WeightlessRMSNorm) and not list(attention.q_norm.parameters())
    x = torch.randn(3, 8)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + attention.q_norm.variance_epsilon)
    assert torch.allclose(attention.q_norm(x), expected)
    assert not any("q_norm" in k for k in attention.state_dict())


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_after_rope_differs_from_before(qk_norm: str) -> None:
    before = model_of(qk_norm=qk_norm)
    after = model_of(qk_norm=qk_norm, qk_norm_after_rope=True)
    after.load_state_dict(before.state_dict())
    assert not torch.allclose(logits(before, IDS), logits(after, IDS), atol=1e-4)


def test_qk_norm_after_rope_normalises_the_rotated_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """After RoPE, every query/key head has unit RMS (weightless norm): the norm ran last."""
    from hf_moe.modeling import attention as module

    config = tiny_gqa_config(qk_norm="head", qk_norm_after_rope=True, qk_norm_weight=False)
    config._attn_implementation = "eager"
    attention = GroupedQueryAttention(config, 0).eval()
    seen: dict[str, torch.Tensor] = {}

    def capture(mod: object, q: torch.Tensor, k: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen["q"], seen["k"] = q, k
        return module.eager_attention_forward(mod, q, k, *args, **kwargs)

    monkeypatch.setattr(module, "attention_function", lambda _config: capture)
    x = torch.randn(2, 5, config.hidden_size)
    with torch.no_grad():
        attention(x, RotaryEmbedding(config)(x, torch.arange(5)[None].expand(2, -1)), None)
    for states in (seen["q"], seen["k"]):
        assert torch.allclose(states.pow(2).mean(-1), torch.ones(()), atol=1e-4)


def test_qk_norm_skip_nope_leaves_the_nope_layers_unnormalised() -> None:
    """Llama 4: the q/k norm on the rotating layers only; the NoPE layers have none, and it changes the logits."""
    fields = dict(qk_norm="head", qk_norm_weight=False, qk_norm_after_rope=True, nope_layers=[1])
    skip, every = model_of(**fields, qk_norm_skip_nope=True), model_of(**fields)
    assert [hasattr(layer.self_attn, "q_norm") for layer in skip.model.layers] == [True, False, True]
    assert all(hasattr(layer.self_attn, "q_norm") for layer in every.model.layers)
    every.load_state_dict(skip.state_dict())
    assert not torch.allclose(logits(skip, IDS), logits(every, IDS), atol=1e-4)
    weighted = model_of(qk_norm="head", nope_layers=[1], qk_norm_skip_nope=True)  # weighted norms: none stored there
    assert not any(k.startswith("model.layers.1.self_attn.q_norm") for k in weighted.state_dict())


# ------------------------------------------------------------------------------- attention temperature
def test_temperature_scales_by_hand() -> None:
    """1 + s ln(1 + floor((t + 1) / f)) with s = 0.5, f = 3 for t = 0..5, and for t = 10, 11 after 10 cached."""
    config = tiny_gqa_config(nope_layers=[1], attention_temperature_scale=0.5, attention_temperature_floor=3)
    expected = 1 + 0.5 * torch.log(torch.tensor([1.0, 1, 2, 2, 2, 3]))
    assert torch.allclose(temperature_scales(config, 0, 6, torch.device("cpu")), expected)
    assert torch.allclose(temperature_scales(config, 10, 2, torch.device("cpu")), 1 + 0.5 * torch.log(torch.tensor([4.0, 5])))


def test_temperature_scales_only_the_nope_layers_queries() -> None:
    """Off on rotating layers (all-RoPE models are unchanged); on NoPE layers it changes the logits, and cached
    decoding (the token index from the cache's length) gives what the full forward gives."""
    base = dict(nope_layers=[1], attention_temperature_floor=2)
    off, on = model_of(**base), model_of(**base, attention_temperature_scale=0.7)
    assert [layer.self_attn.use_temperature for layer in on.model.layers] == [False, True, False]
    on.load_state_dict(off.state_dict())
    assert not torch.allclose(logits(off, IDS), logits(on, IDS), atol=1e-4)
    rope_only, rope_tuned = model_of(), model_of(attention_temperature_scale=0.7)
    rope_tuned.load_state_dict(rope_only.state_dict())
    assert torch.equal(logits(rope_only, IDS), logits(rope_tuned, IDS))
    with torch.no_grad():
        full = on(input_ids=IDS, use_cache=False).logits
        prefix = on(input_ids=IDS[:, :7], use_cache=True)
        step = on(input_ids=IDS[:, 7:], cache=prefix.cache, use_cache=True).logits
    assert torch.allclose(step, full[:, 7:], atol=1e-5)


# ------------------------------------------------------------------------------------------ muP, norms
def test_mup_multipliers_scale_what_they_name() -> None:
    base = model_of()
    mup = model_of(embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0, attention_multiplier=0.2)
    mup.load_state_dict(base.state_dict())
    assert [layer.self_attn.scaling for layer in mup.model.layers] == [0.2] * 3
    one = model_of(logits_scaling=4.0)
    one.load_state_dict(base.state_dict())
    assert torch.allclose(logits(one, IDS), logits(base, IDS) / 4.0, atol=1e-6)
    assert not torch.allclose(logits(mup, IDS), logits(base, IDS) / 4.0, atol=1e-4)


def test_logits_scaling_reaches_the_loss() -> None:
    """The LM loss is taken on logits / logits_scaling (the fused head+loss kernel steps aside)."""
    import hf_moe  # noqa: F401  (registers the fused kernel)

    model = model_of(logits_scaling=4.0, router_bias_update_rate=0.0).train()
    out = model(input_ids=IDS, labels=IDS)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), IDS[:, 1:].reshape(-1))
    assert torch.allclose(out.logits, logits(model.eval(), IDS), atol=1e-5)
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_post_sublayer_norms() -> None:
    """sublayer_norm="post": the layer has OLMo 2's norms (no input norm) and norms each sub-layer's output."""
    model = model_of(sublayer_norm="post")
    layer = model.model.layers[0]
    assert not hasattr(layer, "input_layernorm")
    assert hasattr(layer, "post_feedforward_layernorm")
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        layer.post_attention_layernorm.weight.zero_()
        layer.post_feedforward_layernorm.weight.zero_()
        pos = torch.arange(5)[None].expand(2, -1)
        out, _, _ = layer(x, position_embeddings=model.model.rotary_emb(x, pos))
    assert torch.equal(out, x)  # zero norm weights: both branches vanish


def test_latent_norm_eps_sets_mla_latent_norms() -> None:
    config = tiny_config(rms_norm_eps=1e-5, latent_norm_eps=1e-6)
    attention = MoEForCausalLM(config).model.layers[0].self_attn
    assert attention.kv_a_layernorm.variance_epsilon == 1e-6 == attention.q_a_layernorm.variance_epsilon
    assert MoEForCausalLM(tiny_config(rms_norm_eps=1e-5)).model.layers[0].self_attn.kv_a_layernorm.variance_epsilon == 1e-5


def test_knobs_round_trip_through_config_json(tmp_path) -> None:
    config = tiny_gqa_config(layer_types=[FULL, SLIDING, CHUNKED], sliding_window=4, attention_chunk_size=4,
                             nope_layers=[0], qk_norm_after_rope=True, qk_norm_weight=False, attention_multiplier=0.3,
                             embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=3.0,
                             sublayer_norm="post", qk_norm_skip_nope=True, attention_temperature_scale=0.2,
                             attention_temperature_floor=16)  # fmt: skip
    config.save_pretrained(tmp_path)
    loaded = MoEConfig.from_pretrained(tmp_path)
    for field in ("layer_types", "nope_layers", "qk_norm_after_rope", "qk_norm_weight", "attention_multiplier",
                  "embedding_multiplier", "residual_multiplier", "logits_scaling", "sublayer_norm",
                  "attention_chunk_size", "qk_norm_skip_nope", "attention_temperature_scale",
                  "attention_temperature_floor"):  # fmt: skip
        assert getattr(loaded, field) == getattr(config, field), field
