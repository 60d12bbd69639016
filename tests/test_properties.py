"""Property-based tests (hypothesis) of the values half of issue 14.

- Any config built from a random valid choice constructs, and its model runs forward and backward.
- Any config the validator accepts, from a wide random space that includes bad values, runs too (so what the
  validator lets through never crashes deep in torch), and what it refuses is refused with a ConfigFieldError
  naming a field.
- A random wrong-typed or out-of-range value of any field raises a TypeError / ValueError naming that field.
- Under capacity, masked (padding) tokens never change the decision for real tokens.
- Junk expert selections raise ValueError, never another exception; valid ones keep their meaning.

Examples are few and derandomized (a fixed, reproducible set per run): each one builds a tiny model.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_moe import MoEConfig, MoEForCausalLM  # noqa: E402
from hf_moe.modeling.configuration import FIELD_RULES, ConfigFieldError, _field_types, _matches  # noqa: E402
from hf_moe.modeling.routing import drop_over_capacity  # noqa: E402
from hf_moe.training.expert_selection import validate_selection  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


@st.composite
def valid_fields(draw: st.DrawFn) -> dict[str, Any]:
    """A random valid MoEConfig, tiny: every structural choice the model has (MLA/GQA, dense/MoE, groups...)."""
    heads = draw(st.sampled_from([1, 2, 4]))
    fields: dict[str, Any] = dict(
        vocab_size=draw(st.integers(8, 40)), num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
        intermediate_size=draw(st.integers(1, 24)), max_position_embeddings=64,
        hidden_act=draw(st.sampled_from(["silu", "gelu", "relu"])), tie_word_embeddings=draw(st.booleans()),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 1])), pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    if draw(st.booleans()):
        fields.update(attention_type="mla", hidden_size=draw(st.sampled_from([8, 16, 24])),
                      q_lora_rank=draw(st.sampled_from([None, 4, 8])), kv_lora_rank=draw(st.integers(1, 8)),
                      qk_rope_head_dim=draw(st.sampled_from([2, 4])), qk_nope_head_dim=draw(st.integers(1, 6)),
                      v_head_dim=draw(st.integers(1, 6)), rope_interleave=draw(st.booleans()))  # fmt: skip
    else:
        head_dim = draw(st.sampled_from([2, 4, 8]))
        fields.update(attention_type="gqa", hidden_size=draw(st.sampled_from([8, 16])), head_dim=head_dim,
                      num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
                      qk_norm=draw(st.sampled_from([None, "head", "full"])), attention_bias=draw(st.booleans()),
                      clip_qkv=draw(st.sampled_from([None, 2.0])), sliding_window=draw(st.sampled_from([None, 3])))
        if fields["qk_norm"] == "full":  # OLMoE's full-width norm spans heads * head_dim
            fields["hidden_size"] = heads * head_dim
    experts = draw(st.sampled_from([0, 2, 4, 8]))
    # moe_intermediate_size a multiple of 4: non-SiLU experts run transformers' grouped_mm, which needs 16-byte
    # strides on CPU (down_proj (E, H, I) fp32); other widths crash there (reported, kernels' backend choice)
    fields.update(n_routed_experts=experts, moe_intermediate_size=draw(st.sampled_from([4, 8])),
                  n_shared_experts=draw(st.integers(0, 2)), first_k_dense_replace=draw(st.integers(0, 1)),
                  moe_layer_freq=draw(st.integers(1, 2)), num_nextn_predict_layers=draw(st.integers(0, 1)))
    fields["first_k_dense_replace"] = min(fields["first_k_dense_replace"], fields["num_hidden_layers"])
    fields["shared_expert_gate"] = fields["n_shared_experts"] > 0 and draw(st.booleans())
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    fields.update(scoring_func=scoring, norm_topk_prob=draw(st.booleans()),
                  routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
                  topk_before_softmax=scoring == "softmax" and draw(st.booleans()),
                  capacity_factor=draw(st.sampled_from([None, 0.5, 1.25])), n_group=1, topk_group=1,
                  topk_method="greedy", num_experts_per_tok=1)  # fmt: skip
    if experts:
        groups = draw(st.sampled_from([g for g in (1, 2, 4) if experts % g == 0]))
        method = "greedy" if groups == 1 else draw(st.sampled_from(["group_limited_greedy", "noaux_tc"]))
        if method == "noaux_tc" and experts // groups < 2:
            method = "group_limited_greedy"
        topk_group = draw(st.integers(1, groups))
        top_k = draw(st.integers(1, topk_group * (experts // groups)))
        fields.update(n_group=groups, topk_group=topk_group, topk_method=method, num_experts_per_tok=top_k)
    return fields


def runs(config: MoEConfig) -> None:
    """Forward with padding and labels, then backward: finite loss and gradients of the right shapes."""
    torch.manual_seed(0)
    model = MoEForCausalLM(config).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 5), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (2, 5, config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@settings(max_examples=20, **SETTINGS)
@given(valid_fields())
def test_random_valid_configs_build_a_model_that_runs(fields: dict[str, Any]) -> None:
    runs(MoEConfig(**fields))


@settings(max_examples=30, **SETTINGS)
@given(valid_fields(), st.data())
def test_what_the_validator_accepts_runs(fields: dict[str, Any], data: st.DataObject) -> None:
    """Perturb a valid config with edge values (0, negatives, odd sizes, too many experts...): either the config
    refuses it with an error naming a field, or the model runs."""
    fields["hidden_act"] = "silu"  # odd widths with other activations hit grouped_mm's stride rule (see above)
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(st.sampled_from(sorted(k for k, v in fields.items() if isinstance(v, int)
                                                 and not isinstance(v, bool))))
        fields[field] = data.draw(st.sampled_from([-1, 0, 1, 2, 3, 5, 7, 9, 16]))
    try:
        config = MoEConfig(**fields)
    except ConfigFieldError as error:
        assert error.field in FIELD_RULES and str(error).startswith(f"MoEConfig.{error.field}=")
        return
    runs(config)


def _bad_values(field: str) -> st.SearchStrategy:
    """Values of the wrong type for `field`, or of its type but outside its rule."""
    hint = _field_types()[field]
    junk = st.one_of(st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=4), st.none(), st.lists(st.integers(-3, 3), max_size=2),
                     st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
    rule = FIELD_RULES[field]

    def bad(value: Any) -> bool:
        if not _matches(value, hint):
            return True
        return rule is not None and value is not None and not rule[0](value)

    return junk.filter(bad)


@st.composite
def bad_field(draw: st.DrawFn) -> tuple[str, Any]:
    field = draw(st.sampled_from(sorted(f for f in FIELD_RULES if f != "upcycled_from")))
    return field, draw(_bad_values(field))


@settings(max_examples=300, **SETTINGS)
@given(bad_field())
def test_random_bad_values_are_refused_naming_the_field(case: tuple[str, Any]) -> None:
    field, value = case
    with pytest.raises((ValueError, TypeError)) as error:
        MoEConfig(**{field: value})
    assert isinstance(error.value, ConfigFieldError), repr(error.value)
    assert f"MoEConfig.{field}=" in str(error.value)
    config = MoEConfig()
    with pytest.raises(ConfigFieldError, match=rf"MoEConfig\.{field}="):  # and on assignment
        setattr(config, field, value)


@settings(max_examples=100, **SETTINGS)
@given(st.integers(1, 40), st.integers(1, 4), st.sampled_from([4, 8, 16]),
       st.floats(0.05, 3.0), st.data())
def test_masked_tokens_never_change_real_tokens_capacity(tokens: int, top_k: int, experts: int, factor: float,
                                                          data: st.DataObject) -> None:
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    topk_ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator) + 0.1
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens)))
    kept = drop_over_capacity(topk_ids, weights, experts, factor, mask)
    assert torch.equal(kept[mask], drop_over_capacity(topk_ids[mask], weights[mask], experts, factor))
    assert not kept[~mask].any()


@settings(max_examples=200, **SETTINGS)
@given(st.dictionaries(st.one_of(st.integers(-2, 4), st.text(max_size=2), st.floats(), st.booleans()),
                       st.one_of(st.lists(st.one_of(st.integers(-2, 9), st.floats(), st.booleans(), st.none(),
                                                    st.text(max_size=1)), max_size=3),
                                 st.integers(), st.text(max_size=2), st.none()), max_size=3))
def test_junk_selections_raise_value_errors_only(selection: dict) -> None:
    try:
        result = validate_selection(selection, num_experts=8, layers=[1, 2, 3])
    except ValueError:
        return
    for layer, ids in result.items():
        assert layer in (1, 2, 3) and all(type(e) is int and 0 <= e < 8 for e in ids)
        original = next(v for k, v in selection.items() if (int(k) if isinstance(k, str) else k) == layer)
        assert ids == list(dict.fromkeys(original))  # never coerced: the same ints, in order
        assert not any(isinstance(e, (bool, float)) for e in original)


def test_nan_never_counts_as_a_valid_number() -> None:
    for field, rule in FIELD_RULES.items():
        if rule is not None and _matches(math.nan, _field_types()[field]):
            assert not rule[0](math.nan), field
