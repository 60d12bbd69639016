"""The generic conversion machinery: key rules, named invertible ops, binding, streaming and source checks.

Everything hf_moe knows about one family is one record (`records.MoEFamily` or `records.DenseFamily`) in its
own file of `hf_moe.conversion.families`; this module moves any record's tensors, in both directions. Its key
rows are `Rule(ours, theirs, op)`: our key template, the family's key template(s) and a named op. Templates
are relative to a scope (`model.layers.{i}.` for decoder layers; `mtp.{k}.` / `model.layers.{N+k}.` for
DeepSeek-V3's multi-token-prediction modules); a template starting with `^` is absolute; `{expert}` marks
per-expert keys.
The ops (`OPS`), each with its inverse on export:

    copy       one tensor <-> one tensor (renaming only)
    stack      E per-expert 2-D tensors <-> one (E, ., .) tensor                      (down_proj)
    stack_cat  E gate and E up tensors <-> one (E, 2I, H) tensor, gate rows first     (gate_up_proj)
    zeros      import: the family has no balancing bias, emit zeros(E) fp32 next to the router weight;
               export: check that our bias is zero and drop it
    duplicate  import: several keys must hold one tensor (tied head, MTP's copies of the embedding and
               head): check they are equal, keep none (the main key has its own `copy` row);
               export: write the copies
    drop       export only: our key has no counterpart (a tied `lm_head.weight`, written from the embedding)
    rope_pairs q/k projection rows (or biases) whose rotary dims are interleaved pairs per head (GPT-J style:
               Ernie 4.5, Llama 4) <-> ours, each head's pairs as two halves: the same rotation, and the same
               q.k, since q and k are permuted alike
    squeeze0   one (1, N) tensor <-> one (N,) tensor (Ernie's balancing bias)
    transpose  one (E, A, B) tensor <-> one (E, B, A) tensor (gpt-oss's down_proj)
    interleave_t  one (E, H, 2I) tensor, gate and up columns interleaved (gpt-oss) <-> (E, 2I, H), gate rows first
    interleave    one (..., 2I) tensor, gate and up interleaved <-> (..., 2I), gate first (gpt-oss's biases)
    qkv_q / qkv_k / qkv_v   one fused (q + 2 kv rows, H) tensor (DBRX's Wqkv) <-> its q, k or v rows; export
               writes each as a `Piece` of the fused key, concatenated once all three have arrived
    halves_0 / halves_1   one fused (2R, H) tensor <-> its first or second R rows (Granite's shared MLP
               `input_linear` = [gate; up]); export writes each as a `Piece`, re-fused once both have arrived
    kv_k / kv_v   the same two halves, named for a fused (2 kv rows, H) key/value projection (JetMoE's kv_proj)
    flat_stack_cat  gate and up (E*I, H) tensors (DBRX's w1, v1) <-> one (E, 2I, H) tensor, gate rows first
    flat_transpose  one (E*I, H) tensor (DBRX's w2) <-> one (E, H, I) tensor

Rules carry a `layout`: "transformers" rows name what transformers' modules hold in memory (fused experts, in
5.x); "original" rows name the released checkpoints (per-expert keys, Mixtral's `block_sparse_moe` and
w1/w2/w3). Import accepts both; export writes one. transformers' `from_pretrained` reads either layout.

`StateDictConverter` applies a record one tensor at a time (`push` returns what became complete), so the
streaming converter can feed it shard by shard and only per-expert groups wait in memory; `TensorReader` reads
our tensors by key from a family source (upcycling, layer by layer); `source_problems` checks a source's keys
and shapes (headers only) before anything is written. Tensor dtypes are never changed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..modeling.configuration import MoEConfig
from ..modeling.model import MoEForCausalLM

if TYPE_CHECKING:
    from .records import Family

LAYOUTS = ("transformers", "original")
Shape = tuple[int, ...]

# keys a checkpoint may carry that hold nothing to convert (old non-persistent rotary buffers)
_IGNORED_SOURCE_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def ignored_key(key: str) -> bool:
    """Whether a checkpoint key holds nothing to convert (old non-persistent rotary buffers); it is skipped."""
    return bool(_IGNORED_SOURCE_KEYS.search(key))


# -------------------------------------------------------------------------------------------------- ops
@dataclass(frozen=True)
class Binding:
    """A rule bound to concrete keys: our key, the family's keys (per-expert keys expanded), the op."""

    family: str
    ours: str
    theirs: tuple[str, ...]
    op: str
    layout: str | None
    head_dim: int = 0  # the config's head_dim (what "rope_pairs" permutes within)
    rows: tuple[int, int] = (0, 0)  # q and k/v rows of a fused qkv projection (heads * d, kv_heads * d)
    num_experts: int = 0


@dataclass(frozen=True)
class Piece:
    """Row block `index` of `of` that make one family tensor from several of ours (DBRX's fused Wqkv): export
    concatenates the blocks, in index order, once all have arrived."""

    index: int
    of: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class Op:
    """A named invertible transform between the family tensors of one binding and our one tensor."""

    to_moe: Callable[[Binding, list[torch.Tensor]], torch.Tensor | None]  # the family's parts -> ours (None: none)
    from_moe: Callable[[Binding, torch.Tensor], list[torch.Tensor]]  # ours -> the tensors of `written` keys
    part_shape: Callable[[Shape], Shape | None]  # the shape of each family part of our tensor of this shape
    written: tuple[int, int | None] = (0, None)  # the slice of the binding's family keys export writes
    per_expert: bool = False  # family templates hold {expert}: one key per expert
    makes_ours: bool = True  # False: import only checks the family's tensors

    def written_keys(self, binding: Binding) -> tuple[str, ...]:
        """The family keys export writes for `binding` (what `from_moe`'s tensors become)."""
        return binding.theirs[slice(*self.written)]


def _stack_cat(b: Binding, parts: list[torch.Tensor]) -> torch.Tensor:
    half = len(parts) // 2  # (E, I, H) gate rows then (E, I, H) up rows -> (E, 2I, H)
    return torch.cat([torch.stack(parts[:half]), torch.stack(parts[half:])], dim=1)


def _unstack_cat(b: Binding, tensor: torch.Tensor) -> list[torch.Tensor]:
    gate, up = tensor.chunk(2, dim=1)  # (E, I, H) each
    return [t.clone() for t in (*gate.unbind(0), *up.unbind(0))]


def _zeros_like_router(b: Binding, parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.zeros(parts[0].shape[0], dtype=torch.float32, device=parts[0].device)


def _drop_zero_bias(b: Binding, tensor: torch.Tensor) -> list[torch.Tensor]:
    if torch.count_nonzero(tensor):
        raise ValueError(
            f"Cannot export {b.ours!r} to {b.family}: the family has no router balancing bias "
            f"(e_score_correction_bias) but this one is non-zero (max |b| = {tensor.abs().max().item():.3g})."
        )
    return []


def _check_copies(b: Binding, parts: list[torch.Tensor]) -> None:
    main = parts[0]
    for key, other in zip(b.theirs[1:], parts[1:]):
        if other.shape != main.shape or not torch.equal(other, main.to(other.dtype)):
            raise ValueError(
                f"{b.family}: {key!r} should be a copy of {b.theirs[0]!r} (hf_moe shares one tensor) but it differs."
            )


def _same_shape(whole: Shape) -> Shape:
    return whole


def _rope_halves(b: Binding, parts: list[torch.Tensor]) -> torch.Tensor:
    t, d = parts[0], b.head_dim  # (heads * d, ...): per head, pairs (2i, 2i+1) -> (i, i + d/2)
    return t.reshape(-1, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def _rope_pairs(b: Binding, t: torch.Tensor) -> list[torch.Tensor]:
    d = b.head_dim
    return [t.reshape(-1, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()]


def _concat_halves(t: torch.Tensor) -> torch.Tensor:
    return torch.cat((t[..., ::2], t[..., 1::2]), dim=-1)


def _qkv_op(part: int) -> Op:
    def to_moe(b: Binding, parts: list[torch.Tensor]) -> torch.Tensor:
        q, kv = b.rows
        start, size = (0, q, q + kv)[part], (q, kv, kv)[part]
        return parts[0][start : start + size].clone()

    return Op(to_moe, lambda b, t: [Piece(part, 3, t)], lambda whole: None)


def _halves_op(part: int) -> Op:
    """Row half `part` of a fused (2R, ...) tensor; export writes it as Piece `part` of 2."""

    def to_moe(b: Binding, parts: list[torch.Tensor]) -> torch.Tensor:
        half = parts[0].shape[0] // 2
        return parts[0][part * half : (part + 1) * half].clone()

    return Op(to_moe, lambda b, t: [Piece(part, 2, t)], lambda whole: (2 * whole[0], *whole[1:]))


def _flat_stack_cat(b: Binding, parts: list[torch.Tensor]) -> torch.Tensor:
    gate, up = (p.reshape(b.num_experts, -1, p.shape[-1]) for p in parts)  # (E, I, H) each
    return torch.cat((gate, up), dim=1)


def _flat_unstack_cat(b: Binding, t: torch.Tensor) -> list[torch.Tensor]:
    return [half.reshape(-1, t.shape[-1]).clone() for half in t.chunk(2, dim=1)]


def _interleave_halves(t: torch.Tensor) -> torch.Tensor:
    gate, up = t.chunk(2, dim=-1)
    return torch.stack((gate, up), dim=-1).flatten(-2)


OPS: dict[str, Op] = {
    "copy": Op(lambda b, parts: parts[0], lambda b, t: [t], _same_shape),
    "stack": Op(lambda b, parts: torch.stack(parts), lambda b, t: [x.clone() for x in t.unbind(0)],
                lambda whole: whole[1:], per_expert=True),
    "stack_cat": Op(_stack_cat, _unstack_cat, lambda whole: (whole[1] // 2, *whole[2:]), per_expert=True),
    "zeros": Op(_zeros_like_router, _drop_zero_bias, lambda whole: None, written=(0, 0)),
    "duplicate": Op(_check_copies, lambda b, t: [t] * (len(b.theirs) - 1), _same_shape, written=(1, None),
                    makes_ours=False),
    "drop": Op(lambda b, parts: None, lambda b, t: [], lambda whole: None, written=(0, 0)),
    "rope_pairs": Op(_rope_halves, _rope_pairs, _same_shape),
    "squeeze0": Op(lambda b, parts: parts[0].reshape(-1), lambda b, t: [t.reshape(1, -1)],
                   lambda whole: (1, *whole)),
    "transpose": Op(lambda b, parts: parts[0].transpose(1, 2).contiguous(),
                    lambda b, t: [t.transpose(1, 2).contiguous()], lambda whole: (whole[0], whole[2], whole[1])),
    "interleave_t": Op(lambda b, parts: _concat_halves(parts[0]).transpose(1, 2).contiguous(),
                       lambda b, t: [_interleave_halves(t.transpose(1, 2)).contiguous()],
                       lambda whole: (whole[0], whole[2], whole[1])),
    "interleave": Op(lambda b, parts: _concat_halves(parts[0]).contiguous(),
                     lambda b, t: [_interleave_halves(t).contiguous()], _same_shape),
    "qkv_q": _qkv_op(0), "qkv_k": _qkv_op(1), "qkv_v": _qkv_op(2), "kv_k": _halves_op(0), "kv_v": _halves_op(1),
    "halves_0": _halves_op(0), "halves_1": _halves_op(1),
    "flat_stack_cat": Op(_flat_stack_cat, _flat_unstack_cat, lambda whole: (whole[0] * whole[1] // 2, whole[2])),
    "flat_transpose": Op(
        lambda b, parts: parts[0].reshape(b.num_experts, -1, parts[0].shape[-1]).transpose(1, 2).contiguous(),
        lambda b, t: [t.transpose(1, 2).reshape(-1, t.shape[1]).contiguous()],
        lambda whole: (whole[0] * whole[2], whole[1])),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rule:
    """One key row of a family record: our key, the family's key(s) and the op between them."""

    ours: str
    theirs: tuple[str, ...]
    op: str = "copy"
    layout: str | None = None  # None: both layouts use the row

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Rule.op={self.op!r} is invalid: allowed values are {tuple(OPS)}.")
        if self.layout not in (None, *LAYOUTS):
            raise ValueError(f"Rule.layout={self.layout!r} is invalid: allowed values are None or {LAYOUTS}.")


def same(prefix: str, *names: str) -> tuple[Rule, ...]:
    """Rows whose key is spelled the same on both sides."""
    return tuple(Rule(prefix + n, (prefix + n,)) for n in names)


#: transformers' causal-LM keys outside the decoder layers (every family so far)
CAUSAL_LM_GLOBALS = same("", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


# ---------------------------------------------------------------------------------------------- binding
def _abs(prefix: str, template: str) -> str:
    return template[1:] if template.startswith("^") else prefix + template


def _bind_rule(family: str, rule: Rule, ours_prefix: str, theirs_prefix: str, config: MoEConfig) -> Binding:
    num_experts, head_dim = config.n_routed_experts, config.head_dim or 0
    theirs = [_abs(theirs_prefix, t) for t in rule.theirs]
    if OPS[rule.op].per_expert:  # part order: template-major, then expert
        theirs = [t.format(expert=e) for t in theirs for e in range(num_experts)]
    rows = (config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim)
    return Binding(family, _abs(ours_prefix, rule.ours), tuple(theirs), rule.op, rule.layout, head_dim, rows,
                   num_experts)  # fmt: skip


def bind_table(family: Family, config: MoEConfig, layout: str | None = None) -> list[Binding]:
    """All rows of `family`'s record bound to `config`'s layers, experts and MTP modules.

    `layout=None` keeps the rows of both layouts (import); "transformers" or "original" keeps one (export).
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: allowed values are {LAYOUTS}.")
    n_layers, n_mtp = config.num_hidden_layers, config.num_nextn_predict_layers
    if n_mtp and not family.mtp:
        raise ValueError(
            f"MoEConfig.num_nextn_predict_layers={n_mtp} is invalid for family={family.model_type!r}: "
            "it has no multi-token-prediction modules."
        )
    tied = config.tie_word_embeddings
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    rules: list[tuple[Rule, str, str]] = []
    for rule in family.globals:
        if rule.ours == "lm_head.weight" and tied:
            # transformers' state_dict() lists the tied head too (released checkpoints omit it): on import it
            # is checked against the embedding and dropped; on export it is written from the embedding
            rules.append((Rule(head, (head, "lm_head.weight"), "duplicate", layout="transformers"), "", ""))
            rule = Rule("lm_head.weight", (), "drop")
        rules.append((rule, "", ""))
    for i in range(n_layers):
        rules += [(r, f"model.layers.{i}.", family.layer_prefix.format(i=i)) for r in family.layer]
    mtp_rules = family.mtp + (Rule("^" + head, ("^" + head, "shared_head.head.weight"), "duplicate"),)
    for k in range(n_mtp):
        theirs_prefix = f"model.layers.{n_layers + k}."
        rules += [(r, f"mtp.{k}.", theirs_prefix) for r in mtp_rules]
        rules += [(r, f"mtp.{k}.block.", theirs_prefix) for r in family.layer]
    return [
        _bind_rule(family.model_type, rule, ours_prefix, theirs_prefix, config)
        for rule, ours_prefix, theirs_prefix in rules
        if layout is None or rule.layout in (None, layout)
    ]


# -------------------------------------------------------------------------------------------- converter
@dataclass
class _Group:
    binding: Binding
    parts: dict[int, torch.Tensor] = field(default_factory=dict)


class StateDictConverter:
    """Converts a state dict one tensor at a time with a family record.

    direction "to_moe": family keys in, hf_moe keys out (both layouts accepted; per-expert tensors wait
    until their whole group has arrived, then are stacked). direction "from_moe": hf_moe keys in, the
    family's keys in `layout` out. `push` returns the (key, tensor) pairs that became complete; `finish`
    raises if a group is incomplete. `plan(keys)` says which source keys make each output key.
    """

    def __init__(
        self, family: Family, config: MoEConfig, direction: str = "to_moe", layout: str = "transformers"
    ) -> None:
        if direction not in ("to_moe", "from_moe"):
            raise ValueError(f"direction={direction!r} is invalid: allowed values are ('to_moe', 'from_moe').")
        self.family, self.config, self.direction = family.model_type, config, direction
        self.bindings = bind_table(family, config, None if direction == "to_moe" else layout)
        self._index: dict[str, list[tuple[int, int]]] = {}  # source key -> [(binding id, slot)]
        for b_id, binding in enumerate(self.bindings):
            sources = binding.theirs if direction == "to_moe" else (binding.ours,)
            for slot, key in enumerate(sources):
                self._index.setdefault(key, []).append((b_id, slot))
        self._open: dict[int, _Group] = {}
        self._pieces: dict[str, dict[int, torch.Tensor]] = {}  # export: fused family keys awaiting their blocks
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
            op = OPS[binding.op]
            if self.direction == "to_moe":
                if op.makes_ours and any(k in keys for k in binding.theirs):
                    plan[binding.ours] = [k for k in binding.theirs if k in keys]
            elif binding.ours in keys:
                for out in op.written_keys(binding):
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
            op = OPS[binding.op]
            if self.direction == "from_moe":
                for out_key, made in zip(op.written_keys(binding), op.from_moe(binding, tensor)):
                    out += self._assembled(out_key, made)
                continue
            group = self._open.setdefault(b_id, _Group(binding))
            group.parts[slot] = tensor
            if len(group.parts) == len(binding.theirs):
                del self._open[b_id]
                made = op.to_moe(binding, [group.parts[i] for i in range(len(binding.theirs))])
                if made is not None:
                    out.append((binding.ours, made))
        for out_key, _ in out:
            if out_key in self._emitted:
                raise ValueError(
                    f"{self.family}: output key {out_key!r} is produced twice; the source holds it in two layouts."
                )
            self._emitted.add(out_key)
        return out

    def _assembled(self, key: str, made: torch.Tensor | Piece) -> list[tuple[str, torch.Tensor]]:
        """Export output: a tensor as it is; a `Piece` held until its family tensor is complete."""
        if not isinstance(made, Piece):
            return [(key, made)]
        pieces = self._pieces.setdefault(key, {})
        pieces[made.index] = made.tensor
        if len(pieces) < made.of:
            return []
        del self._pieces[key]
        return [(key, torch.cat([pieces[i] for i in range(made.of)]))]

    def finish(self) -> None:
        """Raise if a per-expert group or a required key is incomplete; drop pending equality checks."""
        incomplete = [f"{key} lacks row blocks (has {sorted(p)})" for key, p in self._pieces.items()]
        self._pieces.clear()
        for group in self._open.values():
            if not OPS[group.binding.op].makes_ours:
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

    def _unknown_message(self, keys: list[str]) -> str:
        hint = (
            " The checkpoint is quantized (fp8 scale tensors); dequantize it first."
            if any(_quantized(k) for k in keys)
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


def _quantized(key: str) -> bool:
    return key.endswith(("_scale_inv", ".weight_scale"))


class TensorReader:
    """Random access to our tensors of a family source: `read(key)` reads the family tensor(s) it is made of
    through `get` (a checkpoint read one layer at a time). Check the source with `source_problems` first."""

    def __init__(self, family: Family, config: MoEConfig, keys: Iterable[str],
                 get: Callable[[str], torch.Tensor]) -> None:  # fmt: skip
        present = set(keys)
        self._get = get
        self._bindings = {
            b.ours: b for b in bind_table(family, config)
            if OPS[b.op].makes_ours and b.theirs and all(k in present for k in b.theirs)
        }  # fmt: skip

    def read(self, key: str) -> torch.Tensor:
        binding = self._bindings[key]
        made = OPS[binding.op].to_moe(binding, [self._get(k) for k in binding.theirs])
        assert made is not None, f"{binding.op} makes no tensor of ours"
        return made


# ---------------------------------------------------------------------------------------------- checking
def expected_shapes(config: MoEConfig) -> dict[str, Shape]:
    """Key -> shape of every tensor an hf_moe checkpoint of `config` holds (model built on the meta device;
    a tied head is left out, as on disk)."""
    with torch.device("meta"):
        model = MoEForCausalLM(copy.deepcopy(config))
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@dataclass
class SourceProblems:
    """What is wrong with a source's keys and shapes for a converter (empty lists: nothing)."""

    unexpected: list[str] = field(default_factory=list)  # keys the table does not know for this config
    missing: list[str] = field(default_factory=list)  # our keys no source key makes
    incomplete: list[str] = field(default_factory=list)  # per-expert groups lacking some experts
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # (key, shape found, shape wanted)
    nonzero: list[str] = field(default_factory=list)  # non-zero balancing biases the family has no place for

    @property
    def quantized(self) -> bool:
        """Whether the unexpected keys look like an fp8 checkpoint's scale tensors."""
        return any(_quantized(k) for k in self.unexpected)

    def __bool__(self) -> bool:
        return any((self.unexpected, self.missing, self.incomplete, self.mismatched, self.nonzero))


def source_problems(converter: StateDictConverter, keys: Iterable[str], shape: Callable[[str], Shape],
                    expected: Mapping[str, Shape], get: Callable[[str], torch.Tensor] | None = None
                    ) -> SourceProblems:  # fmt: skip
    """Compare a source's keys and shapes (`shape(key)`, headers only) with what `expected` (hf_moe keys ->
    shapes, `expected_shapes`) needs through `converter`. For an hf_moe source (direction "from_moe"), `get`
    reads the balancing biases that a family without them only takes when zero."""
    present = list(keys)
    found = set(present)
    problems = SourceProblems(unexpected=converter.unmatched(present))

    def check(key: str, want: Shape | None) -> None:
        if want is not None and tuple(shape(key)) != tuple(want):
            problems.mismatched.append((key, tuple(shape(key)), tuple(want)))

    if converter.direction == "from_moe":  # the source holds hf_moe keys
        problems.unexpected = [k for k in present if k not in expected and not ignored_key(k)]
        problems.missing = [k for k in expected if k not in found]
        for key in sorted(found & expected.keys()):
            check(key, expected[key])
        for binding in converter.bindings:  # a family without balancing bias takes only a zero one (E floats)
            if binding.op == "zeros" and binding.ours in found and get is not None and torch.count_nonzero(
                    get(binding.ours)):  # fmt: skip
                problems.nonzero.append(binding.ours)
        return problems
    made: set[str] = set()
    for binding in converter.bindings:
        have = [k for k in binding.theirs if k in found]
        if not have:
            continue
        if binding.ours not in expected:  # a row of the table this config has no tensor for (e.g. a bias)
            problems.unexpected += have
            continue
        op = OPS[binding.op]
        if not op.makes_ours:  # copies of the embedding / head
            for key in have:
                check(key, expected[binding.ours])
            continue
        if len(have) < len(binding.theirs):
            absent = [k for k in binding.theirs if k not in found]
            lacks = f"{binding.ours} lacks {len(absent)} of {len(binding.theirs)}, e.g. {absent[:3]}"
            problems.incomplete.append(lacks)
            continue
        made.add(binding.ours)
        for key in have:
            check(key, op.part_shape(expected[binding.ours]))
    problems.missing = [k for k in expected if k not in made]
    problems.unexpected = sorted(set(problems.unexpected))
    return problems


__all__ = [
    "CAUSAL_LM_GLOBALS",
    "LAYOUTS",
    "OPS",
    "Binding",
    "Op",
    "Rule",
    "SourceProblems",
    "StateDictConverter",
    "TensorReader",
    "bind_table",
    "expected_shapes",
    "ignored_key",
    "same",
    "source_problems",
]
