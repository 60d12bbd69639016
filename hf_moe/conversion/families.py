"""One key table per model family, run in both directions (transformers family <-> hf_moe).

A table lists rows `Rule(ours, theirs, op)`: our key template, the family's key template(s), and a named
transform. Templates are relative to a scope (`model.layers.{i}.` for decoder layers, `mtp.{k}.` /
`model.layers.{N+k}.` for DeepSeek-V3's multi-token-prediction modules); a template starting with `^` is
absolute. `{expert}` marks per-expert keys. Operations, with their inverse on export:

    copy       one tensor <-> one tensor (renaming only)
    stack      E per-expert 2-D tensors <-> one (E, ., .) tensor                      (down_proj)
    stack_cat  E gate and E up tensors <-> one (E, 2I, H) tensor, gate rows first     (gate_up_proj)
    zeros      import: the family has no balancing bias, emit zeros(E) fp32 next to the router weight;
               export: check that our bias is zero and drop it
    duplicate  import: several keys must hold one tensor (tied head, MTP's copies of the embedding and
               head): check they are equal, keep none (the main key has its own `copy` row);
               export: write the copies
    drop       export only: our key has no counterpart (a tied `lm_head.weight`, written from the embedding)

Rules carry a `layout`: "transformers" rows name what transformers' modules hold in memory (fused experts,
in 5.x); "original" rows name the released checkpoints (per-expert keys, Mixtral's `block_sparse_moe` and
w1/w2/w3). Import accepts both; export writes one. transformers' `from_pretrained` reads either layout.

`StateDictConverter` applies a table one tensor at a time (`push` returns what became complete), so the
streaming converter can feed it shard by shard and only per-expert groups wait in memory.
Tensor dtypes are never changed (the model keeps its router fp32 itself).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedConfig

from ..modeling.configuration import MoEConfig

logger = logging.getLogger(__name__)

FAMILIES = ("deepseek_v3", "deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
LAYOUTS = ("transformers", "original")
OPS = ("copy", "stack", "stack_cat", "zeros", "duplicate", "drop")

# keys a checkpoint may carry that hold nothing to convert (old non-persistent rotary buffers)
_IGNORED_SOURCE_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ------------------------------------------------------------------------------------------------ table
@dataclass(frozen=True)
class Rule:
    """One row of a family table: our key, the family's key(s) and the transform between them."""

    ours: str
    theirs: tuple[str, ...]
    op: str = "copy"
    layout: str | None = None  # None: both layouts use the row

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Rule.op={self.op!r} is invalid: allowed values are {OPS}.")
        if self.layout not in (None, *LAYOUTS):
            raise ValueError(f"Rule.layout={self.layout!r} is invalid: allowed values are None or {LAYOUTS}.")


@dataclass(frozen=True)
class FamilyTable:
    """Key rows of one family: global keys, decoder-layer keys and (DeepSeek-V3) MTP-module keys."""

    model_type: str
    globals: tuple[Rule, ...]
    layer: tuple[Rule, ...]
    mtp: tuple[Rule, ...] = ()


def _same(prefix: str, *names: str) -> tuple[Rule, ...]:
    """Rows whose key is spelled the same on both sides."""
    return tuple(Rule(prefix + n, (prefix + n,)) for n in names)


_NORMS_AND_DENSE = _same("", "input_layernorm.weight", "post_attention_layernorm.weight") + _same(
    "mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
)
_MLA = _same(
    "self_attn.",
    "q_proj.weight", "q_a_proj.weight", "q_a_proj.bias", "q_a_layernorm.weight", "q_b_proj.weight",
    "kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias", "kv_a_layernorm.weight", "kv_b_proj.weight",
    "o_proj.weight", "o_proj.bias",
)  # fmt: skip
_GQA = _same(
    "self_attn.",
    "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
    "o_proj.weight", "o_proj.bias", "q_norm.weight", "k_norm.weight",
)  # fmt: skip


def _routed(
    orig_prefix: str = "mlp.", gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj", bias: bool = False
) -> tuple[Rule, ...]:
    """Router and routed-expert rows; `orig_prefix`/`gate`/`up`/`down` spell the original checkpoints."""
    rows = [
        Rule("mlp.gate.weight", ("mlp.gate.weight",), layout="transformers" if orig_prefix != "mlp." else None),
        Rule("mlp.experts.gate_up_proj", ("mlp.experts.gate_up_proj",), layout="transformers"),
        Rule("mlp.experts.down_proj", ("mlp.experts.down_proj",), layout="transformers"),
        Rule(
            "mlp.experts.gate_up_proj",
            (f"{orig_prefix}experts.{{expert}}.{gate}.weight", f"{orig_prefix}experts.{{expert}}.{up}.weight"),
            "stack_cat",
            layout="original",
        ),
        Rule("mlp.experts.down_proj", (f"{orig_prefix}experts.{{expert}}.{down}.weight",), "stack", layout="original"),
    ]
    if orig_prefix != "mlp.":
        rows.append(Rule("mlp.gate.weight", (f"{orig_prefix}gate.weight",), layout="original"))
    if bias:
        rows.append(Rule("mlp.gate.e_score_correction_bias", ("mlp.gate.e_score_correction_bias",)))
    elif orig_prefix == "mlp.":
        rows.append(Rule("mlp.gate.e_score_correction_bias", ("mlp.gate.weight",), "zeros"))
    else:
        rows.append(Rule("mlp.gate.e_score_correction_bias", ("mlp.gate.weight",), "zeros", layout="transformers"))
        rows.append(Rule("mlp.gate.e_score_correction_bias", (f"{orig_prefix}gate.weight",), "zeros", layout="original"))
    return tuple(rows)


_DEEPSEEK_SHARED = _same("mlp.shared_experts.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
_QWEN2_SHARED = tuple(
    Rule(f"mlp.shared_experts.{n}", (f"mlp.shared_expert.{n}",))
    for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
) + _same("mlp.", "shared_expert_gate.weight")

_GLOBALS = _same("", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")

# DeepSeek-V3 MTP module k: ours `mtp.{k}.*`, theirs `model.layers.{N+k}.*` (README_WEIGHTS of DeepSeek-V3).
# The shared head row is completed at bind time (it names the embedding when the head is tied).
_V3_MTP = _same("", "enorm.weight", "hnorm.weight", "eh_proj.weight") + (
    Rule("norm.weight", ("shared_head.norm.weight",)),
    Rule("^model.embed_tokens.weight", ("^model.embed_tokens.weight", "embed_tokens.weight"), "duplicate"),
)

TABLES: dict[str, FamilyTable] = {
    "deepseek_v3": FamilyTable(
        "deepseek_v3", _GLOBALS, _NORMS_AND_DENSE + _MLA + _routed(bias=True) + _DEEPSEEK_SHARED, _V3_MTP
    ),
    "deepseek_v2": FamilyTable("deepseek_v2", _GLOBALS, _NORMS_AND_DENSE + _MLA + _routed() + _DEEPSEEK_SHARED),
    "mixtral": FamilyTable(
        "mixtral", _GLOBALS, _NORMS_AND_DENSE + _GQA + _routed("block_sparse_moe.", "w1", "w3", "w2")
    ),
    "qwen2_moe": FamilyTable("qwen2_moe", _GLOBALS, _NORMS_AND_DENSE + _GQA + _routed() + _QWEN2_SHARED),
    "qwen3_moe": FamilyTable("qwen3_moe", _GLOBALS, _NORMS_AND_DENSE + _GQA + _routed()),
    "olmoe": FamilyTable("olmoe", _GLOBALS, _NORMS_AND_DENSE + _GQA + _routed()),
}


def _check_family(family: str) -> FamilyTable:
    if family not in TABLES:
        raise ValueError(f"family={family!r} is not supported: allowed values are {FAMILIES}.")
    return TABLES[family]


# ------------------------------------------------------------------------------------------ binding
@dataclass(frozen=True)
class Binding:
    """A rule bound to concrete keys: our key, the family's keys (per-expert keys expanded), the op."""

    ours: str
    theirs: tuple[str, ...]
    op: str
    layout: str | None


def _abs(prefix: str, template: str) -> str:
    return template[1:] if template.startswith("^") else prefix + template


def _bind_rule(rule: Rule, ours_prefix: str, theirs_prefix: str, num_experts: int) -> Binding:
    theirs = [_abs(theirs_prefix, t) for t in rule.theirs]
    if rule.op in ("stack", "stack_cat"):  # part order: template-major, then expert
        theirs = [t.format(expert=e) for t in theirs for e in range(num_experts)]
    return Binding(_abs(ours_prefix, rule.ours), tuple(theirs), rule.op, rule.layout)


def bind_table(family: str, config: MoEConfig, layout: str | None = None) -> list[Binding]:
    """All rows of `family`'s table bound to `config`'s layers, experts and MTP modules.

    `layout=None` keeps the rows of both layouts (import); "transformers" or "original" keeps one (export).
    """
    table = _check_family(family)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: allowed values are {LAYOUTS}.")
    n_layers, n_experts, n_mtp = config.num_hidden_layers, config.n_routed_experts, config.num_nextn_predict_layers
    if n_mtp and not table.mtp:
        raise ValueError(
            f"MoEConfig.num_nextn_predict_layers={n_mtp} is invalid for family={family!r}: "
            "it has no multi-token-prediction modules (only deepseek_v3 does)."
        )
    tied = config.tie_word_embeddings
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    rules: list[tuple[Rule, str, str]] = []
    for rule in table.globals:
        if rule.ours == "lm_head.weight" and tied:
            # transformers' state_dict() lists the tied head too (released checkpoints omit it): on import it
            # is checked against the embedding and dropped; on export it is written from the embedding
            rules.append((Rule(head, (head, "lm_head.weight"), "duplicate", layout="transformers"), "", ""))
            rule = Rule("lm_head.weight", (), "drop")
        rules.append((rule, "", ""))
    for i in range(n_layers):
        rules += [(r, f"model.layers.{i}.", f"model.layers.{i}.") for r in table.layer]
    mtp_rules = table.mtp + (Rule("^" + head, ("^" + head, "shared_head.head.weight"), "duplicate"),)
    for k in range(n_mtp):
        theirs_prefix = f"model.layers.{n_layers + k}."
        rules += [(r, f"mtp.{k}.", theirs_prefix) for r in mtp_rules]
        rules += [(r, f"mtp.{k}.block.", theirs_prefix) for r in table.layer]
    return [
        _bind_rule(rule, ours_prefix, theirs_prefix, n_experts)
        for rule, ours_prefix, theirs_prefix in rules
        if layout is None or rule.layout in (None, layout)
    ]


# ---------------------------------------------------------------------------------------- converter
@dataclass
class _Group:
    binding: Binding
    parts: dict[int, torch.Tensor] = field(default_factory=dict)


class StateDictConverter:
    """Converts a state dict one tensor at a time with a family table.

    direction "to_moe": family keys in, hf_moe keys out (both layouts accepted; per-expert tensors wait
    until their whole group has arrived, then are stacked). direction "from_moe": hf_moe keys in, the
    family's keys in `layout` out. `push` returns the (key, tensor) pairs that became complete; `finish`
    raises if a group is incomplete. `plan(keys)` says which source keys make each output key.
    """

    def __init__(
        self, family: str, config: MoEConfig, direction: str = "to_moe", layout: str = "transformers"
    ) -> None:
        if direction not in ("to_moe", "from_moe"):
            raise ValueError(f"direction={direction!r} is invalid: allowed values are ('to_moe', 'from_moe').")
        self.family, self.config, self.direction = family, config, direction
        self.bindings = bind_table(family, config, None if direction == "to_moe" else layout)
        self._index: dict[str, list[tuple[int, int]]] = {}  # source key -> [(binding id, slot)]
        for b_id, binding in enumerate(self.bindings):
            sources = binding.theirs if direction == "to_moe" else (binding.ours,)
            for slot, key in enumerate(sources):
                self._index.setdefault(key, []).append((b_id, slot))
        self._open: dict[int, _Group] = {}
        self._emitted: set[str] = set()

    # ---------------------------------------------------------------------------------- queries
    def matches(self, key: str) -> bool:
        """Whether `key` is a source key of this table (or one that is safely ignored)."""
        return key in self._index or bool(_IGNORED_SOURCE_KEYS.search(key))

    def unmatched(self, keys: Iterable[str]) -> list[str]:
        """Source keys the table does not know."""
        return [k for k in keys if not self.matches(k)]

    def plan(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """Output key -> the source keys (among `keys`) it is made from; use it to plan shard reads."""
        keys = set(keys)
        plan: dict[str, list[str]] = {}
        for binding in self.bindings:
            if self.direction == "to_moe":
                if binding.op == "duplicate":
                    continue
                if any(k in keys for k in binding.theirs):
                    plan[binding.ours] = [k for k in binding.theirs if k in keys]
            elif binding.ours in keys and binding.op not in ("zeros", "drop"):
                outs = binding.theirs[1:] if binding.op == "duplicate" else binding.theirs
                for out in outs:
                    plan[out] = [binding.ours]
        return plan

    # -------------------------------------------------------------------------------- conversion
    def push(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Feed one source tensor; return the output tensors that became complete."""
        if key not in self._index:
            if _IGNORED_SOURCE_KEYS.search(key):
                return []
            raise ValueError(self._unknown_message([key]))
        out: list[tuple[str, torch.Tensor]] = []
        for b_id, slot in self._index[key]:
            binding = self.bindings[b_id]
            if self.direction == "from_moe":
                out += self._export(binding, tensor)
                continue
            group = self._open.setdefault(b_id, _Group(binding))
            group.parts[slot] = tensor
            if len(group.parts) == len(binding.theirs):
                del self._open[b_id]
                out += self._import(binding, [group.parts[i] for i in range(len(binding.theirs))])
        for out_key, _ in out:
            if out_key in self._emitted:
                raise ValueError(
                    f"{self.family}: output key {out_key!r} is produced twice; the source holds it in two layouts."
                )
            self._emitted.add(out_key)
        return out

    def finish(self) -> None:
        """Raise if a per-expert group or a required key is incomplete; drop pending equality checks."""
        incomplete = []
        for group in self._open.values():
            if group.binding.op == "duplicate":
                continue  # the copy is optional (e.g. a tied head not written); nothing to check against
            missing = [k for i, k in enumerate(group.binding.theirs) if i not in group.parts]
            incomplete.append(f"{group.binding.ours} lacks {len(missing)} source key(s), e.g. {missing[:3]}")
        self._open.clear()
        if incomplete:
            raise ValueError(f"{self.family}: incomplete tensors: " + "; ".join(incomplete[:5]))
        if self.direction == "to_moe":
            for k in range(self.config.num_nextn_predict_layers):
                if not any(key.startswith(f"mtp.{k}.") for key in self._emitted):
                    raise ValueError(
                        f"{self.family}: config says num_nextn_predict_layers={self.config.num_nextn_predict_layers}"
                        f" but the checkpoint has no weights for MTP module {k} (keys "
                        f"model.layers.{self.config.num_hidden_layers + k}.*); set num_nextn_predict_layers=0 "
                        "to drop multi-token prediction."
                    )

    def _import(self, binding: Binding, parts: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        op, n = binding.op, self.config.n_routed_experts
        if op == "copy":
            return [(binding.ours, parts[0])]
        if op == "stack":
            return [(binding.ours, torch.stack(parts))]
        if op == "stack_cat":  # (E, I, H) gate rows then (E, I, H) up rows -> (E, 2I, H)
            return [(binding.ours, torch.cat([torch.stack(parts[:n]), torch.stack(parts[n:])], dim=1))]
        if op == "zeros":
            return [(binding.ours, torch.zeros(parts[0].shape[0], dtype=torch.float32, device=parts[0].device))]
        # duplicate: every copy must equal the main tensor
        main = parts[0]
        for key, other in zip(binding.theirs[1:], parts[1:]):
            if other.shape != main.shape or not torch.equal(other, main.to(other.dtype)):
                raise ValueError(
                    f"{self.family}: {key!r} should be a copy of {binding.theirs[0]!r} (hf_moe shares one tensor) "
                    "but it differs."
                )
        return []

    def _export(self, binding: Binding, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        op = binding.op
        if op == "copy":
            return [(binding.theirs[0], tensor)]
        if op == "stack":
            return [(key, t.clone()) for key, t in zip(binding.theirs, tensor.unbind(0))]
        if op == "stack_cat":
            gate, up = tensor.chunk(2, dim=1)  # (E, I, H) each
            return [(k, t.clone()) for k, t in zip(binding.theirs, [*gate.unbind(0), *up.unbind(0)])]
        if op == "drop":
            return []
        if op == "zeros":
            if torch.count_nonzero(tensor):
                raise ValueError(
                    f"Cannot export {binding.ours!r} to {self.family}: the family has no router balancing bias "
                    f"(e_score_correction_bias) but this one is non-zero (max |b| = {tensor.abs().max().item():.3g})."
                )
            return []
        return [(key, tensor) for key in binding.theirs[1:]]  # duplicate: write the copies

    def _unknown_message(self, keys: list[str]) -> str:
        fp8 = [k for k in keys if k.endswith("_scale_inv") or k.endswith(".weight_scale")]
        hint = (
            " The checkpoint is quantized (fp8 scale tensors); dequantize it first."
            if fp8
            else " Check the family and the config (layer, expert and MTP counts, tie_word_embeddings)."
        )
        side = "family" if self.direction == "to_moe" else "hf_moe"
        return f"{self.family}: {len(keys)} {side} key(s) not in the conversion table, e.g. {keys[:5]}.{hint}"

    def convert(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert a whole state dict (checks every key first, so all unknown keys are reported at once)."""
        unknown = self.unmatched(tensors)
        if unknown:
            raise ValueError(self._unknown_message(unknown))
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            out.update(self.push(key, tensor))
        self.finish()
        return out


def state_dict_to_moe(
    family: str, tensors: Mapping[str, torch.Tensor], config: MoEConfig | PreTrainedConfig
) -> dict[str, torch.Tensor]:
    """A `family` state dict (transformers' in-memory names or the original per-expert checkpoint names)
    as an hf_moe state dict. `config` is the family's config or the converted MoEConfig."""
    if not isinstance(config, MoEConfig):
        config = config_to_moe(config)
    return StateDictConverter(family, config, "to_moe").convert(tensors)


def state_dict_from_moe(
    family: str, tensors: Mapping[str, torch.Tensor], moe_config: MoEConfig, layout: str = "transformers"
) -> dict[str, torch.Tensor]:
    """An hf_moe state dict as a `family` state dict. layout "transformers": exactly the keys of the
    family's transformers model (fused experts; a tied head is listed too, as in its `state_dict()`);
    "original": the released checkpoints' per-expert keys. Both load with the family's `from_pretrained`.
    DeepSeek-V3 MTP modules go to `model.layers.{N+k}.*` with copies of the embedding and head."""
    config_from_moe(moe_config, family)  # refuses what the family cannot express
    return StateDictConverter(family, moe_config, "from_moe", layout).convert(tensors)


# ------------------------------------------------------------------------------------------- configs
_COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "output_router_logits",
)  # fmt: skip


def _common_to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    fields = {name: getattr(hf, name) for name in _COMMON_FIELDS if hasattr(hf, name)}
    fields["attention_dropout"] = getattr(hf, "attention_dropout", 0.0) or 0.0
    fields["rope_parameters"] = copy.deepcopy(dict(hf.rope_parameters))
    if getattr(hf, "dtype", None) is not None:
        fields["dtype"] = hf.dtype
    return fields


def _mla_to_moe(hf: PreTrainedConfig, rope_interleave: bool) -> dict[str, Any]:
    if hf.n_shared_experts == 0:
        raise ValueError(
            f"{hf.model_type} config n_shared_experts=0 is not supported: transformers builds zero-width shared "
            "experts for it, which hf_moe does not store."
        )
    return dict(
        attention_type="mla", q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
        qk_rope_head_dim=hf.qk_rope_head_dim, qk_nope_head_dim=hf.qk_nope_head_dim, v_head_dim=hf.v_head_dim,
        rope_interleave=rope_interleave, attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias,
        intermediate_size=hf.intermediate_size, n_routed_experts=hf.n_routed_experts,
        num_experts_per_tok=hf.num_experts_per_tok, moe_intermediate_size=hf.moe_intermediate_size,
        n_shared_experts=hf.n_shared_experts, first_k_dense_replace=hf.first_k_dense_replace or 0,
        moe_layer_freq=1, routed_scaling_factor=hf.routed_scaling_factor, **_deepseek_losses(hf),
    )  # fmt: skip


def _deepseek_losses(hf: PreTrainedConfig) -> dict[str, float]:
    """DeepSeek's released config.json files carry `aux_loss_alpha` and `seq_aux` (its remote code's balance
    loss: sequence-wise when seq_aux); transformers' config classes keep them as extra attributes."""
    alpha = getattr(hf, "aux_loss_alpha", None)
    if not alpha:
        return {}
    return {"seq_aux_loss_alpha": alpha} if getattr(hf, "seq_aux", False) else {"aux_loss_alpha": alpha}


def _gqa_to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=head_dim,
        n_routed_experts=hf.num_experts if hasattr(hf, "num_experts") else hf.num_local_experts,
        num_experts_per_tok=hf.num_experts_per_tok, scoring_func="softmax", topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.0, n_shared_experts=0,
        # these families train with a Switch-style balance loss, not the bias
        router_bias_update_rate=0.0, aux_loss_alpha=getattr(hf, "router_aux_loss_coef", 0.0),
    )  # fmt: skip


def _moe_layer_pattern(hf: PreTrainedConfig) -> dict[str, int]:
    """Qwen's `decoder_sparse_step` / `mlp_only_layers` as first_k_dense_replace / moe_layer_freq."""
    n = hf.num_hidden_layers
    mlp_only = set(hf.mlp_only_layers or [])
    step = hf.decoder_sparse_step
    moe = [i for i in range(n) if i not in mlp_only and hf.num_experts > 0 and (i + 1) % step == 0]
    if not moe:
        return dict(first_k_dense_replace=n, moe_layer_freq=1)
    first = moe[0]
    freq = moe[1] - moe[0] if len(moe) > 1 else max(1, n - first)
    if moe != list(range(first, n, freq)):
        raise ValueError(
            f"{hf.model_type} config mlp_only_layers={sorted(mlp_only)} with decoder_sparse_step={step} gives MoE "
            f"layers {moe}; hf_moe places MoE layers as first_k_dense_replace + j * moe_layer_freq and cannot "
            "express this set."
        )
    return dict(first_k_dense_replace=first, moe_layer_freq=freq)


def _no_sliding_layers(hf: PreTrainedConfig) -> None:
    layer_types = getattr(hf, "layer_types", None) or []
    if getattr(hf, "use_sliding_window", False) and "sliding_attention" in layer_types:
        raise ValueError(
            f"{hf.model_type} config use_sliding_window=True is not supported: it applies the window to some "
            f"layers only (layer_types={layer_types}), hf_moe's sliding_window applies to every layer."
        )


def config_to_moe(hf_config: PreTrainedConfig) -> MoEConfig:
    """The MoEConfig of a transformers config of one of `FAMILIES` (by `model_type`).

    Fields a family does not have take hf_moe's defaults, except: families other than DeepSeek-V3 get
    router_bias_update_rate=0 (no bias balancing) and aux_loss_alpha from router_aux_loss_coef
    (`switch_coef_to_alpha`). The mapping
    follows what transformers' modeling code computes (the oracle), not the config's field names:
    DeepSeek-V2 gets norm_topk_prob=False (transformers' DeepseekV2TopkRouter never renormalises; its
    norm_topk_prob field is unused) and rope_interleave=True (it rotates (x0, x1), (x2, x3)... as complex
    numbers); Mixtral gets norm_topk_prob=True (softmax, top-k, renormalise == softmax of the top-k logits).
    Raises ValueError naming the field for what hf_moe cannot express.
    """
    family = hf_config.model_type
    _check_family(family)
    fields = _common_to_moe(hf_config)
    if family == "deepseek_v3":
        fields.update(_mla_to_moe(hf_config, rope_interleave=bool(hf_config.rope_interleave)))
        fields.update(
            scoring_func="sigmoid", topk_method="noaux_tc", n_group=hf_config.n_group or 1,
            topk_group=hf_config.topk_group or 1, norm_topk_prob=bool(hf_config.norm_topk_prob),
            num_nextn_predict_layers=getattr(hf_config, "num_mtp_layers", 0) or 0,
        )  # fmt: skip
    elif family == "deepseek_v2":
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("deepseek_v2 config mlp_bias=True is not supported: hf_moe FFNs have no biases.")
        method = hf_config.topk_method
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(
                f"deepseek_v2 config topk_method={method!r} is not supported: allowed values are "
                "('greedy', 'group_limited_greedy') (what transformers' DeepseekV2 router implements)."
            )
        if hf_config.norm_topk_prob:
            logger.warning(
                "deepseek_v2 config norm_topk_prob=True is ignored by transformers' DeepseekV2 router (it never "
                "renormalises the top-k weights); hf_moe follows transformers and uses norm_topk_prob=False."
            )
        grouped = method == "group_limited_greedy"
        # transformers' DeepseekV2 rotates (x0, x1), (x2, x3)... pairs as complex numbers: interleaved rope
        fields.update(_mla_to_moe(hf_config, rope_interleave=True))
        fields.update(
            scoring_func="softmax", topk_method=method, n_group=(hf_config.n_group or 1) if grouped else 1,
            topk_group=(hf_config.topk_group or 1) if grouped else 1, norm_topk_prob=False,
            router_bias_update_rate=0.0,
        )  # fmt: skip
    elif family == "mixtral":
        fields.update(_gqa_to_moe(hf_config))
        fields.update(
            intermediate_size=hf_config.intermediate_size, moe_intermediate_size=hf_config.intermediate_size,
            first_k_dense_replace=0, moe_layer_freq=1, norm_topk_prob=True, sliding_window=hf_config.sliding_window,
            router_jitter_noise=hf_config.router_jitter_noise or 0.0,
        )  # fmt: skip
    elif family == "qwen2_moe":
        _no_sliding_layers(hf_config)
        if hf_config.shared_expert_intermediate_size <= 0:
            raise ValueError(
                "qwen2_moe config shared_expert_intermediate_size must be positive: hf_moe does not store the "
                "zero-width shared expert transformers would build."
            )
        fields.update(_gqa_to_moe(hf_config))
        fields.update(_moe_layer_pattern(hf_config))
        fields.update(
            intermediate_size=hf_config.intermediate_size, moe_intermediate_size=hf_config.moe_intermediate_size,
            attention_bias=hf_config.qkv_bias, attention_out_bias=False, n_shared_experts=1,
            shared_expert_intermediate_size=hf_config.shared_expert_intermediate_size, shared_expert_gate=True,
            norm_topk_prob=hf_config.norm_topk_prob,
        )  # fmt: skip
    elif family == "qwen3_moe":
        fields.update(_gqa_to_moe(hf_config))
        fields.update(_moe_layer_pattern(hf_config))
        fields.update(
            intermediate_size=hf_config.intermediate_size, moe_intermediate_size=hf_config.moe_intermediate_size,
            attention_bias=hf_config.attention_bias, attention_out_bias=hf_config.attention_bias, qk_norm="head",
            sliding_window=hf_config.sliding_window if hf_config.use_sliding_window else None,
            norm_topk_prob=hf_config.norm_topk_prob,
        )  # fmt: skip
    else:  # olmoe
        fields.update(_gqa_to_moe(hf_config))
        if fields["head_dim"] * hf_config.num_attention_heads != hf_config.hidden_size:
            raise ValueError(
                f"olmoe config head_dim={fields['head_dim']} is not supported: OLMoE's q_norm spans hidden_size, "
                "so head_dim * num_attention_heads must equal hidden_size."
            )
        fields.update(
            intermediate_size=hf_config.intermediate_size, moe_intermediate_size=hf_config.intermediate_size,
            first_k_dense_replace=0, moe_layer_freq=1, attention_bias=hf_config.attention_bias,
            attention_out_bias=hf_config.attention_bias, qk_norm="full", clip_qkv=hf_config.clip_qkv,
            norm_topk_prob=hf_config.norm_topk_prob,
        )  # fmt: skip
    config = MoEConfig(**fields)
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        config.aux_loss_alpha = switch_coef_to_alpha(config.aux_loss_alpha, config)
    return config


def switch_coef_to_alpha(coef: float, cfg: MoEConfig) -> float:
    """transformers' Switch-style loss (Mixtral/Qwen/OLMoE) is N * sum_i (count_i / T) P_i over all layers'
    tokens pooled, i.e. about K times our per-layer expert-level loss averaged over layers; ours is summed
    over MoE layers. alpha = coef * K / L keeps the same strength (exact when layers route alike)."""
    return coef * cfg.num_experts_per_tok / max(1, len(cfg.moe_layer_indices))


def alpha_to_switch_coef(alpha: float, cfg: MoEConfig) -> float:
    """Inverse of `switch_coef_to_alpha`."""
    return alpha * max(1, len(cfg.moe_layer_indices)) / cfg.num_experts_per_tok


def _refuse(family: str, cfg: MoEConfig, name: str, why: str) -> ValueError:
    return ValueError(f"Cannot export to {family}: MoEConfig.{name}={getattr(cfg, name)!r} {why}.")


def _export_checks(cfg: MoEConfig, family: str) -> None:
    """Refuse what `family` cannot express (inference semantics only; training knobs are dropped)."""

    def need(name: str, ok: bool, why: str) -> None:
        if not ok:
            raise _refuse(family, cfg, name, why)

    mla = family in ("deepseek_v2", "deepseek_v3")
    need("attention_type", cfg.attention_type == ("mla" if mla else "gqa"), f"but {family} uses {'mla' if mla else 'gqa'}")
    need("n_routed_experts", cfg.n_routed_experts > 0, f"but {family} is a mixture of experts")
    need("topk_before_softmax", not cfg.topk_before_softmax or family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
         f"but {family}'s router takes softmax over all experts first")  # fmt: skip
    if family != "deepseek_v3":
        need("num_nextn_predict_layers", cfg.num_nextn_predict_layers == 0, f"but {family} has no MTP modules")
    if family == "deepseek_v3":
        need("scoring_func", cfg.scoring_func == "sigmoid", "but deepseek_v3's router uses sigmoid")
        need("topk_method", cfg.topk_method == "noaux_tc" or cfg.n_group == 1,
             "but deepseek_v3 scores groups by the sum of their top-2 biased scores ('noaux_tc')")  # fmt: skip
    elif family == "deepseek_v2":
        need("scoring_func", cfg.scoring_func == "softmax", "but deepseek_v2's router uses softmax")
        need("topk_method", cfg.topk_method == "group_limited_greedy" or cfg.n_group == 1,
             "but deepseek_v2 scores groups by their max score ('group_limited_greedy')")  # fmt: skip
        need("norm_topk_prob", not cfg.norm_topk_prob, "but transformers' deepseek_v2 never renormalises gate values")
        need("rope_interleave", cfg.rope_interleave, "but deepseek_v2 rotates interleaved pairs")
    else:
        need("scoring_func", cfg.scoring_func == "softmax", f"but {family}'s router uses softmax")
        need("n_group", cfg.n_group == 1, f"but {family} has no group-limited routing")
        need("routed_scaling_factor", cfg.routed_scaling_factor == 1, f"but {family} does not scale gate values")
    if family in ("deepseek_v2", "deepseek_v3"):
        need("attention_out_bias", cfg.attention_out_bias == cfg.attention_bias,
             f"but {family} has one attention_bias flag for q_a/kv_a and o_proj")  # fmt: skip
        need("moe_layer_freq", cfg.moe_layer_freq == 1, f"but {family} makes every layer after the dense ones MoE")
        need("shared_expert_gate", not cfg.shared_expert_gate, f"but {family} has no shared-expert gate")
        need("shared_expert_intermediate_size",
             cfg.shared_intermediate_size > 0 and cfg.shared_intermediate_size % cfg.moe_intermediate_size == 0,
             f"but {family}'s shared experts are n_shared_experts > 0 experts of moe_intermediate_size")  # fmt: skip
        return
    need("qk_norm", cfg.qk_norm == {"qwen3_moe": "head", "olmoe": "full"}.get(family),
         f"but {family} has qk_norm {({'qwen3_moe': 'head', 'olmoe': 'full'}.get(family))!r}")  # fmt: skip
    need("clip_qkv", cfg.clip_qkv is None or family == "olmoe", f"but {family} does not clip q/k/v")
    need("sliding_window", cfg.sliding_window is None or family in ("mixtral", "qwen3_moe"),
         f"but {family} has no sliding window on every layer")  # fmt: skip
    if family in ("mixtral", "qwen3_moe", "olmoe"):
        need("shared_intermediate_size", cfg.shared_intermediate_size == 0, f"but {family} has no shared experts")
    if family in ("mixtral", "olmoe"):
        need("first_k_dense_replace", cfg.first_k_dense_replace == 0, f"but every {family} layer is MoE")
        need("moe_layer_freq", cfg.moe_layer_freq == 1, f"but every {family} layer is MoE")
    if family == "mixtral":
        need("norm_topk_prob", cfg.norm_topk_prob or cfg.topk_before_softmax,
             "but mixtral renormalises the top-k gate values")  # fmt: skip
        need("attention_bias", not cfg.attention_bias, "but mixtral has no attention biases")
        need("attention_out_bias", not cfg.attention_out_bias, "but mixtral has no attention biases")
    if family == "qwen2_moe":
        need("shared_expert_gate", cfg.shared_expert_gate and cfg.shared_intermediate_size > 0,
             "but qwen2_moe always has one shared expert scaled by a sigmoid gate")  # fmt: skip
        need("attention_out_bias", not cfg.attention_out_bias, "but qwen2_moe's o_proj has no bias")
    if family in ("qwen3_moe", "olmoe"):
        need("attention_out_bias", cfg.attention_out_bias == cfg.attention_bias,
             f"but {family} has one attention_bias flag for q/k/v and o_proj")  # fmt: skip
    if family == "olmoe":
        need("head_dim", cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size,
             "but OLMoE's q_norm spans hidden_size (head_dim * num_attention_heads must equal hidden_size)")  # fmt: skip


def _common_from_moe(cfg: MoEConfig) -> dict[str, Any]:
    fields = {name: getattr(cfg, name) for name in _COMMON_FIELDS}
    fields.update(attention_dropout=cfg.attention_dropout, rope_parameters=copy.deepcopy(dict(cfg.rope_parameters)))
    if getattr(cfg, "dtype", None) is not None:
        fields["dtype"] = cfg.dtype
    return fields


def config_from_moe(moe_config: MoEConfig, family: str) -> PreTrainedConfig:
    """The transformers config of `family` for `moe_config`; raises ValueError naming the field the family
    cannot express. Training-only knobs (bias update rate, balance/z-losses, capacity, noise, MTP loss
    weight) are dropped, except router_aux_loss_coef (from aux_loss_alpha) and Mixtral's router_jitter_noise."""
    _check_family(family)
    cfg = moe_config
    _export_checks(cfg, family)
    fields = _common_from_moe(cfg)
    experts = dict(num_experts_per_tok=cfg.num_experts_per_tok)
    if family in ("deepseek_v2", "deepseek_v3"):
        fields.update(
            q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
            qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=cfg.attention_bias,
            num_key_value_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
            n_routed_experts=cfg.n_routed_experts, moe_intermediate_size=cfg.moe_intermediate_size,
            n_shared_experts=cfg.shared_intermediate_size // cfg.moe_intermediate_size,
            first_k_dense_replace=cfg.first_k_dense_replace, routed_scaling_factor=cfg.routed_scaling_factor,
            n_group=cfg.n_group, topk_group=cfg.topk_group, **experts,
        )  # fmt: skip
        if family == "deepseek_v3":
            fields.update(
                norm_topk_prob=cfg.norm_topk_prob, rope_interleave=cfg.rope_interleave,
                num_mtp_layers=cfg.num_nextn_predict_layers,
            )  # fmt: skip
        else:
            fields.update(topk_method="greedy" if cfg.n_group == 1 else "group_limited_greedy", norm_topk_prob=False)
        return AutoConfig.for_model(family, **fields)
    fields.update(num_key_value_heads=cfg.num_key_value_heads, router_aux_loss_coef=alpha_to_switch_coef(cfg.aux_loss_alpha, cfg), **experts)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        fields["head_dim"] = cfg.head_dim
    norm = cfg.norm_topk_prob or cfg.topk_before_softmax  # the two are the same function of the logits
    if family == "mixtral":
        fields.update(
            intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.n_routed_experts,
            sliding_window=cfg.sliding_window, router_jitter_noise=cfg.router_jitter_noise,
        )  # fmt: skip
    elif family in ("qwen2_moe", "qwen3_moe"):
        freq, first = cfg.moe_layer_freq, cfg.first_k_dense_replace
        step = freq if (first + 1) % freq == 0 else 1
        mlp_only = [i for i in range(cfg.num_hidden_layers) if (i + 1) % step == 0 and not cfg.is_moe_layer(i)]
        fields.update(
            intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
            num_experts=cfg.n_routed_experts, decoder_sparse_step=step, mlp_only_layers=mlp_only,
            norm_topk_prob=norm,
        )  # fmt: skip
        if family == "qwen2_moe":
            fields.update(qkv_bias=cfg.attention_bias, shared_expert_intermediate_size=cfg.shared_intermediate_size)
        else:
            fields.update(
                attention_bias=cfg.attention_bias, use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window,
            )  # fmt: skip
    else:  # olmoe
        fields.pop("head_dim", None)
        fields.update(
            intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
            attention_bias=cfg.attention_bias, clip_qkv=cfg.clip_qkv, norm_topk_prob=norm,
        )  # fmt: skip
    return AutoConfig.for_model(family, **fields)


__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "TABLES",
    "Binding",
    "FamilyTable",
    "Rule",
    "StateDictConverter",
    "bind_table",
    "config_from_moe",
    "config_to_moe",
    "state_dict_from_moe",
    "state_dict_to_moe",
]
