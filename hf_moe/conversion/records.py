"""The record format: what every family file of `hf_moe.conversion.families` defines, and the config mapping it
drives. A record is a `MoEFamily` (converted both ways by `hf_moe.convert`) or a `DenseFamily` (a source for
`hf_moe.upcycle`): its key rows (moved by `tables`), its config mapping and its refusals, named so that the
error says which field, which value and what the other side needs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from ..modeling.configuration import MoEConfig
from .tables import CAUSAL_LM_GLOBALS, Rule


@dataclass(frozen=True)
class Refusal:
    """A configuration the other side cannot express: `field` is refused unless `ok(config)`; `why` says what
    the other side needs (`{family}` is replaced by the family's model_type)."""

    field: str
    ok: Callable[[Any], bool]
    why: str


def refuse_import(hf_config: PreTrainedConfig, field_name: str, why: str) -> ValueError:
    """The error for a family config hf_moe cannot express (the field, its value and why)."""
    value = getattr(hf_config, field_name, None)
    return ValueError(f"{hf_config.model_type} config {field_name}={value!r} is not supported: {why}.")


def _refuse_export(family: str, config: MoEConfig, field_name: str, why: str) -> ValueError:
    value = getattr(config, field_name)
    return ValueError(f"Cannot export to {family}: MoEConfig.{field_name}={value!r} {why}.")



_COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "output_router_logits",
)  # fmt: skip


def _common_fields(config: PreTrainedConfig) -> dict[str, Any]:
    """The fields every family spells like MoEConfig (shape, norms, token ids, RoPE, dropout, dtype)."""
    fields = {name: getattr(config, name) for name in _COMMON_FIELDS if hasattr(config, name)}
    fields["attention_dropout"] = getattr(config, "attention_dropout", 0.0) or 0.0
    fields["rope_parameters"] = copy.deepcopy(dict(config.rope_parameters or {}))
    if getattr(config, "dtype", None) is not None:
        fields["dtype"] = config.dtype
    return fields


@dataclass(frozen=True, kw_only=True)
class Family:
    """What every record holds: the transformers `model_type`, the key rows (global, per decoder layer and,
    for families with multi-token prediction, per MTP module), and the config mapping into MoEConfig:
    `to_moe(family_config)` returns the fields the family spells its own way (the common ones, see
    `_COMMON_FIELDS`, are added here) after `import_refusals` passed."""

    model_type: str
    layer: tuple[Rule, ...]
    to_moe: Callable[[PreTrainedConfig], dict[str, Any]]
    globals: tuple[Rule, ...] = CAUSAL_LM_GLOBALS
    layer_prefix: str = "model.layers.{i}."  # the family's decoder layer i (DBRX: "transformer.blocks.{i}.")
    mtp: tuple[Rule, ...] = ()
    import_refusals: tuple[Refusal, ...] = ()

    def moe_fields(self, hf_config: PreTrainedConfig) -> dict[str, Any]:
        """MoEConfig fields of a family config; raises ValueError naming the field hf_moe cannot express."""
        for refusal in self.import_refusals:
            if not refusal.ok(hf_config):
                raise refuse_import(hf_config, refusal.field, refusal.why.format(family=self.model_type))
        return {**_common_fields(hf_config), **self.to_moe(hf_config)}


@dataclass(frozen=True, kw_only=True)
class DenseFamily(Family):
    """A dense family hf_moe upcycles from: `moe_fields` gives the model shape and attention (no experts), so
    `MoEConfig(**fields, n_routed_experts=0)` is the same dense model, whose keys the layer rows name."""


#: MoEConfig's FFN, router and norm variants beyond DeepSeek's architecture (field -> the default, which every
#: family expresses); a record lists in `MoEFamily.variants` those it expresses otherwise, the rest are refused
VARIANT_DEFAULTS: dict[str, Any] = {
    "mlp_bias": False, "expert_bias": False, "router_bias": False, "lm_head_bias": False, "glu_type": "glu",
    "glu_limit": None, "norm_type": "rms_norm", "norm_topk_p": 1.0, "norm_topk_min": 1e-20,
    "gate_on_expert_input": False, "last_k_dense_replace": 0, "attention_sinks": False,
    "moe_output_bias": False, "moa_experts": 0,
}  # fmt: skip


def _variant_refusals(variants: frozenset[str]) -> tuple[Refusal, ...]:
    refusals = [
        Refusal(name, lambda c, name=name, default=default: getattr(c, name) == default,
                f"but {{family}} cannot express it (only {default!r})")
        for name, default in VARIANT_DEFAULTS.items() if name not in variants
    ]  # fmt: skip
    if "sparsemixer" not in variants:
        refusals.append(Refusal("topk_method", lambda c: c.topk_method != "sparsemixer",
                                "but {family} has no SparseMixer routing"))  # fmt: skip
    return tuple(refusals)


_NO_MTP = Refusal("num_nextn_predict_layers", lambda c: c.num_nextn_predict_layers == 0,
                  "but {family} has no MTP modules")  # fmt: skip
_LEARNED_ROUTER = Refusal("router_type", lambda c: c.router_type == "learned",
                          "but {family} routes with a learned top-k router")  # fmt: skip


def _one_layer_type(c: MoEConfig) -> bool:
    """Every layer has the attention type the config implies without `layer_types` (sliding where a window is set)."""
    implied = "sliding_attention" if c.sliding_window is not None else "full_attention"
    return c.layer_types is None or set(c.layer_types) == {implied}


#: attention-side knobs: a family exports a non-default value only if it names the knob in `MoEFamily.knobs`
ATTENTION_KNOBS: dict[str, Refusal] = {
    "layer_types": Refusal("layer_types", _one_layer_type, "but {family} has one attention type for every layer"),
    "attention_chunk_size": Refusal("attention_chunk_size", lambda c: c.attention_chunk_size is None,
                                    "but {family} has no chunked attention"),
    "nope_layers": Refusal("nope_layers", lambda c: not c.nope_layers, "but every {family} layer rotates (RoPE)"),
    "partial_rotary_factor": Refusal("rope_parameters", lambda c: c.attention_type == "mla" or c.rotary_dim == c.head_dim,
                                     "has partial_rotary_factor < 1 but {family} rotates the whole head"),
    "qk_norm_after_rope": Refusal("qk_norm_after_rope", lambda c: not c.qk_norm_after_rope,
                                  "but {family} normalises q/k before RoPE"),
    "qk_norm_weight": Refusal("qk_norm_weight", lambda c: c.qk_norm_weight, "but {family}'s q/k norms have weights"),
    "qk_norm_skip_nope": Refusal("qk_norm_skip_nope", lambda c: not c.qk_norm_skip_nope,
                                 "but {family} normalises q/k on every layer"),
    "attention_temperature_scale": Refusal("attention_temperature_scale", lambda c: c.attention_temperature_scale is None,
                                           "but {family} has no attention temperature tuning"),
    "attention_multiplier": Refusal("attention_multiplier", lambda c: c.attention_multiplier is None,
                                    "but {family} scales attention by 1/sqrt(head_dim)"),
    "embedding_multiplier": Refusal("embedding_multiplier", lambda c: c.embedding_multiplier == 1,
                                    "but {family} does not scale embeddings"),
    "residual_multiplier": Refusal("residual_multiplier", lambda c: c.residual_multiplier == 1,
                                   "but {family} does not scale residual branches"),
    "latent_norm_eps": Refusal("latent_norm_eps", lambda c: c.latent_norm_eps in (None, c.rms_norm_eps),
                               "but {family}'s q_a/kv_a norms use rms_norm_eps"),
    "sublayer_norm": Refusal("sublayer_norm", lambda c: c.sublayer_norm == "pre",
                             "but {family} normalises each sub-layer's input (pre-norm)"),
    "logits_scaling": Refusal("logits_scaling", lambda c: c.logits_scaling == 1, "but {family} does not scale logits"),
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class MoEFamily(Family):
    """An MoE family converted both ways. `from_moe(moe_config)` returns the family's config fields it spells
    its own way, after `export_refusals` passed (configurations the family cannot express, refused with the
    field and value named; attention-side knobs outside `knobs` are refused too, see `ATTENTION_KNOBS`). `switch_loss`: the family's `router_aux_loss_coef` is transformers' Switch-style
    balance loss, mapped to and from our `aux_loss_alpha` (`switch_coef_to_alpha`)."""

    from_moe: Callable[[MoEConfig], dict[str, Any]]
    export_refusals: tuple[Refusal, ...] = ()
    switch_loss: bool = False
    variants: frozenset[str] = frozenset()  # the VARIANT_DEFAULTS fields (and "sparsemixer") it expresses
    #: the `ATTENTION_KNOBS` this family expresses (the others must keep their defaults to export)
    knobs: frozenset[str] = frozenset()

    def config_to_moe(self, hf_config: PreTrainedConfig) -> MoEConfig:
        """The MoEConfig of a config of this family (fields it does not have take hf_moe's defaults)."""
        config = MoEConfig(**self.moe_fields(hf_config))
        if self.switch_loss:
            config.aux_loss_alpha = switch_coef_to_alpha(config.aux_loss_alpha, config)
        return config

    def check_export(self, config: MoEConfig) -> None:
        """Raise ValueError naming the field for what this family cannot express (inference semantics only;
        training-only knobs are dropped on export)."""
        unsupported = tuple(refusal for knob, refusal in ATTENTION_KNOBS.items() if knob not in self.knobs)
        refusals = (_LEARNED_ROUTER, *_variant_refusals(self.variants), *self.export_refusals,
                    *(() if self.mtp else (_NO_MTP,)), *unsupported)
        for refusal in refusals:
            if not refusal.ok(config):
                raise _refuse_export(self.model_type, config, refusal.field, refusal.why.format(family=self.model_type))

    def config_from_moe(self, config: MoEConfig) -> PreTrainedConfig:
        """This family's transformers config for `config`; raises ValueError naming what it cannot express."""
        self.check_export(config)
        fields = {**_common_fields(config), **self.from_moe(config)}
        if self.switch_loss:
            fields["router_aux_loss_coef"] = alpha_to_switch_coef(config.aux_loss_alpha, config)
        return AutoConfig.for_model(self.model_type, **fields)


def switch_coef_to_alpha(coef: float, cfg: MoEConfig) -> float:
    """transformers' Switch-style loss (Mixtral/Qwen/OLMoE) is N * sum_i (count_i / T) P_i over all layers'
    tokens pooled, i.e. about K times our per-layer expert-level loss averaged over layers; ours is summed
    over MoE layers. alpha = coef * K / L keeps the same strength (exact when layers route alike)."""
    return coef * cfg.num_experts_per_tok / max(1, len(cfg.moe_layer_indices))


def alpha_to_switch_coef(alpha: float, cfg: MoEConfig) -> float:
    """Inverse of `switch_coef_to_alpha`."""
    return alpha * max(1, len(cfg.moe_layer_indices)) / cfg.num_experts_per_tok


__all__ = [
    "DenseFamily",
    "Family",
    "MoEFamily",
    "Refusal",
    "ATTENTION_KNOBS",
    "alpha_to_switch_coef",
    "refuse_import",
    "switch_coef_to_alpha",
]
