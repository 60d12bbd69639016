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

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedConfig

from ..modeling.configuration import MoEConfig
from .family_configs import FAMILIES, check_family, config_from_moe, config_to_moe

LAYOUTS = ("transformers", "original")
OPS = ("copy", "stack", "stack_cat", "zeros", "duplicate", "drop")

# keys a checkpoint may carry that hold nothing to convert (old non-persistent rotary buffers)
_IGNORED_SOURCE_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def ignored_key(key: str) -> bool:
    """Whether a checkpoint key holds nothing to convert (old non-persistent rotary buffers); it is skipped."""
    return bool(_IGNORED_SOURCE_KEYS.search(key))


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


assert set(TABLES) == set(FAMILIES), "every family with a config mapping has a key table"


def _check_family(family: str) -> FamilyTable:
    return TABLES[check_family(family)]


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
        return key in self._index or ignored_key(key)

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
            if ignored_key(key):
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


__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "TABLES",
    "Binding",
    "FamilyTable",
    "Rule",
    "StateDictConverter",
    "bind_table",
    "ignored_key",
    "state_dict_from_moe",
    "state_dict_to_moe",
]
