"""Dense -> MoE upcycling: a Llama/Mistral/Qwen2/Qwen3 checkpoint becomes an hf_moe model computing the same function.

A SwiGLU FFN is a sum over its F intermediate neurons, down(act(gate x) * up x) = sum_n down[:, n] act(gate_n x)
up_n x, so its neurons can be partitioned into shards without loss (He et al. 2024, arXiv 2410.07524):

* the FFN is split into `granularity` G shards of I = F / G neurons (the expert width);
* `shared_experts` S of them become the shared experts (always on; the first S shards, or the S*I most active
  neurons on the probe batch);
* the remaining R = G - S shards are "routed shards"; the N = num_experts routed experts are C = N / R copies
  of them: expert j is shard (j mod R) of copy floor(j / R), and every expert of a copy gets the same router
  row, so the router scores a copy's shards identically and top-k picks whole copies;
* with top-k weights renormalised (norm_topk_prob), top_k = m * R picks m whole copies whose weights sum to
  1 over m*R shards, so the routed sum is FFN_routed / R: a factor R on the routed down_proj (the default,
  `scale_on="down_proj"`) or routed_scaling_factor = R (`scale_on="routed_scaling_factor"`) makes the MoE
  equal the dense model whatever the router weights are, for softmax and sigmoid scores. (Megatron's
  cube-root scaling of both matrices is not exact for SiLU.) G = 1, S = 0 is copy upcycling (Komatsuzaki
  et al. 2022, every expert a copy of the FFN), exact for any top_k;
* group-limited routing (n_group > 1) stays exact when every group holds whole copies ((N / n_group) % R == 0);
  dense layers kept by first_k_dense_replace / moe_layer_freq are copied verbatim.

Router initialisation: "random" (N(0, initializer_range) per copy), "zero" (uniform scores; ties between
copies are broken by a per-copy e_score_correction_bias of -1e-5 * copy, so top-k still picks whole copies),
or "hidden" (mergekit-moe's hidden mode: per copy, the unit-norm mean FFN-input state of the last token of the
probe texts assigned to it). Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261) re-draws a fraction r
of every expert's neurons from N(mean, std) of the dense matrices: diversity instead of exactness.

Every upcycle runs the dense model (transformers' own classes) and the MoE model side by side on a probe
batch, one layer at a time, and reports max |logit difference| (`UpcycleReport`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from ..hub import add_remote_code
from ..inspection import count_parameters
from ..modeling.configuration import MoEConfig
from ..modeling.model import MoEForCausalLM
from ..modeling.rotary import RotaryEmbedding
from .checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    TOKENIZER_FILES,
    CheckpointError,
    ShardedWriter,
    SourceCheckpoint,
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
    parse_size,
    tokenizer_files,
)
from .families import get_dense_family
from .probe import LayerwiseRunner, ProbeBatch, compare_logits
from .tables import StateDictConverter, TensorReader, expected_shapes, source_problems
from .upcycle_recipe import (
    UpcycleRecipe,
    build_moe_config,
    invalid_argument,
    neuron_activity,
    neuron_partition,
    router_rows,
    upcycle_ffn,
)
from .validation import non_finite_logits, require_floating_weights

logger = logging.getLogger(__name__)

EXACT_RTOL = 1e-4  # measured max |dlogit| <= EXACT_RTOL * max(1, max |logit|) counts as exact (fp32 probe)


@dataclass
class UpcycleReport:
    """What an upcycle built and how well it preserves the dense model's function."""

    output: str | None
    recipe: dict[str, Any]
    base_model: str
    base_model_type: str
    expected_exact: bool
    why_not_exact: list[str]
    max_abs_logit_diff: float | None = None
    max_abs_logit: float | None = None
    probe_tokens: int = 0
    params_dense: int = 0
    params_total: int = 0
    params_active: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """Exact by construction and confirmed on the probe batch (fp32, tolerance EXACT_RTOL relative)."""
        if not self.expected_exact or self.max_abs_logit_diff is None:
            return False
        return self.max_abs_logit_diff <= EXACT_RTOL * max(1.0, self.max_abs_logit or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exact": self.exact}

    def __str__(self) -> str:
        lines = [f"upcycled {self.base_model} ({self.base_model_type}) -> {self.output or 'in-memory model'}",
                 f"  recipe: {self.recipe}",
                 f"  parameters: dense {self.params_dense:,} -> MoE total {self.params_total:,}, "
                 f"active {self.params_active:,}"]  # fmt: skip
        if self.max_abs_logit_diff is not None:
            lines.append(f"  function preservation on {self.probe_tokens} probe tokens: max |dlogit| = "
                         f"{self.max_abs_logit_diff:.3g} (max |logit| {self.max_abs_logit:.3g}) -> "
                         f"{'exact' if self.exact else 'NOT exact'}")  # fmt: skip
        lines += [f"  not exact because: {why}" for why in self.why_not_exact]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- streaming
def _dense_source(dense_config: PreTrainedConfig, keys: list[str], shape: Callable[[str], tuple[int, ...]],
                  get: Callable[[str], torch.Tensor]) -> tuple[dict[str, Any], TensorReader, list[str]]:
    """The dense source read through its family record: the MoEConfig fields of the dense model, a reader of
    its tensors under our keys and the keys of one decoder layer (relative). Every key the family needs, with its
    shape, and nothing else, or a clear error before any output."""
    record = get_dense_family(dense_config.model_type)
    family = record.model_type
    fields = record.moe_fields(dense_config)
    dense = MoEConfig(**fields, n_routed_experts=0)  # the same dense model in our keys
    expected = expected_shapes(dense)
    found = source_problems(StateDictConverter(record, dense, "to_moe"), keys, shape, expected)
    missing = found.missing + found.incomplete
    if missing:
        raise CheckpointError(f"The {family} checkpoint lacks {len(missing)} tensors its config implies, e.g. "
                              f"{missing[:4]}.")  # fmt: skip
    if found.unexpected:
        raise CheckpointError(f"The {family} checkpoint has {len(found.unexpected)} tensors upcycling does not know, "
                              f"e.g. {found.unexpected[:4]} (is config.json the checkpoint's own?).")  # fmt: skip
    if found.mismatched:
        key, got, want = found.mismatched[0]
        raise CheckpointError(f"Shape mismatch for {key!r}: the {family} config implies {want}, the checkpoint has "
                              f"{got}.")  # fmt: skip
    first = "model.layers.0."
    layer_keys = [key[len(first):] for key in expected if key.startswith(first)]
    return fields, TensorReader(record, dense, keys, get), layer_keys


def _hidden_rows(ffn_input: torch.Tensor, batch: ProbeBatch, copies: int) -> torch.Tensor:
    """(C, H): per copy, the mean last-token FFN input of the probe texts assigned to it (text t -> copy t mod C)."""
    last = ffn_input[torch.arange(ffn_input.shape[0]), batch.last_positions].float()  # (texts, H)
    return torch.stack([last[c::copies].mean(dim=0) for c in range(copies)])


def _run(get: Callable[[str], torch.Tensor], keys: list[str], shape: Callable[[str], tuple[int, ...]],
         dense_config: PreTrainedConfig, recipe: UpcycleRecipe, emit: Callable[[str, torch.Tensor], None],
         batch: ProbeBatch | None, base_model: str, progress: bool, release: Callable[[], None] = lambda: None
         ) -> tuple[MoEConfig, UpcycleReport]:
    """Upcycle layer by layer: read one dense layer, emit its MoE tensors, advance both probe forwards;
    `release()` runs after each layer (the streaming source drops its memory maps there)."""
    fields, source, layer_keys = _dense_source(dense_config, keys, shape, get)
    recipe.check(fields["intermediate_size"])
    family = dense_config.model_type
    config = build_moe_config(fields, recipe, base_model, family)
    if recipe.router_init == "hidden" and (batch is None or batch.input_ids.shape[0] < recipe.copies):
        raise invalid_argument("router_init", "hidden", f"needs at least one probe text per copy ({recipe.copies} copies)")
    dtype = source.read("model.norm.weight").dtype
    report = UpcycleReport(output=None, recipe=config.upcycled_from, base_model=base_model, base_model_type=family,
                           expected_exact=False, why_not_exact=recipe.exactness_issues(dtype))  # fmt: skip
    report.expected_exact = not report.why_not_exact
    dense = moe = None
    if batch is not None:
        dense, moe = LayerwiseRunner(dense_config, batch, "dense"), LayerwiseRunner(config, batch, "moe")
    embed = source.read("model.embed_tokens.weight")
    emit("model.embed_tokens.weight", embed)
    if dense is not None:
        dense.embed(embed)
        moe.embed(embed)
    del embed
    needs_activity = recipe.shared_selection == "active" and recipe.shared_experts > 0
    for i in tqdm(range(config.num_hidden_layers), desc="upcycling layers", disable=not progress):
        prefix = f"model.layers.{i}."
        tensors = {k: source.read(prefix + k) for k in layer_keys}
        ffn_input = dense.layer(i, tensors) if dense is not None else None
        if config.is_moe_layer(i):
            gate, up, down = (tensors.pop(f"mlp.{p}_proj.weight") for p in ("gate", "up", "down"))
            activity = (neuron_activity(ffn_input, gate, up, config.hidden_act, batch.valid())
                        if needs_activity else None)  # fmt: skip
            shared_ids, routed_ids = neuron_partition(gate.shape[0], recipe, activity)
            hidden = _hidden_rows(ffn_input, batch, recipe.copies) if recipe.router_init == "hidden" else None
            weight, bias = router_rows(recipe, config.hidden_size, config.initializer_range, i, hidden)
            tensors.update({"mlp.gate.weight": weight, "mlp.gate.e_score_correction_bias": bias})
            experts = upcycle_ffn(gate, up, down, recipe, i, shared_ids, routed_ids)
            tensors.update({f"mlp.{k}": v for k, v in experts.items()})
            del gate, up, down, experts
        for key in sorted(tensors):
            emit(prefix + key, tensors[key])
        if moe is not None:
            moe.layer(i, tensors)
        del tensors
        release()
    norm = source.read("model.norm.weight")
    emit("model.norm.weight", norm)
    head = source.read("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
    if not config.tie_word_embeddings:
        emit("lm_head.weight", head)
    if dense is not None:
        report.max_abs_logit_diff, report.max_abs_logit = compare_logits(dense, moe, norm, head)
        report.probe_tokens = int(batch.attention_mask.sum())
    counts = count_parameters(config)
    report.params_total, report.params_active = counts.total, counts.active
    report.params_dense = sum(math.prod(shape(k)) for k in keys if k != "lm_head.weight" or not config.tie_word_embeddings)
    not_finite = None if dense is None else non_finite_logits(report.max_abs_logit_diff, report.max_abs_logit)
    if not_finite:
        report.why_not_exact.append(not_finite)
        logger.warning("Upcycled model not checked: %s", not_finite)
    elif report.expected_exact and report.max_abs_logit_diff is not None and not report.exact:
        report.why_not_exact.append(f"measured max |dlogit| {report.max_abs_logit_diff:.3g} exceeds the fp32 tolerance "
                                    "although the recipe is exact (please report this)")  # fmt: skip
        logger.warning("Upcycled model differs from the dense model: %s", report.why_not_exact[-1])
    config.upcycled_from = {**config.upcycled_from, "function_preservation": {
        "exact": report.exact, "max_abs_logit_diff": None if not_finite else report.max_abs_logit_diff,
        "probe_tokens": report.probe_tokens,
        "why_not_exact": list(report.why_not_exact)}}  # fmt: skip
    report.recipe = config.upcycled_from
    return config, report


def _probe_batch(recipe: UpcycleRecipe, vocab_size: int, probe: bool, texts: list[str] | None,
                 ids: list[list[int]] | torch.Tensor | None, tokenizer: Any) -> ProbeBatch | None:
    """The probe batch: token ids, or texts tokenised one by one (right padding), or random tokens."""
    if ids is not None:
        return ProbeBatch.from_ids(ids)
    if texts:
        if tokenizer is None:
            raise ValueError("probe_texts need a tokenizer (none found in the source folder).")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return ProbeBatch.from_ids([tokenizer(t)["input_ids"] for t in texts], pad_id=pad)
    if recipe.router_init == "hidden":
        raise invalid_argument("router_init", "hidden", "needs probe_texts (or probe_input_ids), at least one per copy")
    if recipe.shared_selection == "active" and recipe.shared_experts:
        logger.warning("shared_selection='active' measures neuron activity on random tokens: pass probe_texts.")
    return ProbeBatch.random(vocab_size, seed=recipe.seed) if probe or recipe.shared_selection == "active" else None


def upcycle(
    src: str | os.PathLike,
    out: str | os.PathLike,
    recipe: UpcycleRecipe | None = None,
    *,
    probe: bool = True,
    probe_texts: list[str] | None = None,
    probe_input_ids: list[list[int]] | torch.Tensor | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    base_model: str | None = None,
    remote_code: bool = True,
    **recipe_fields: Any,
) -> UpcycleReport:
    """Upcycle the dense checkpoint folder `src` (a family of `DENSE_FAMILIES`: Llama, Mistral, Qwen2, Qwen3;
    safetensors) into an hf_moe checkpoint at `out`, streaming one decoder layer at a time (peak memory ~ one
    output shard + one layer).

    `recipe` (`UpcycleRecipe`) says what to build; its fields may also be given, or overridden, as keywords:
    `upcycle(src, out, num_experts=8, top_k=2)` == `upcycle(src, out, UpcycleRecipe(num_experts=8, top_k=2))`
    (an unknown keyword is a TypeError naming it). The layout (granularity G shards of intermediate_size / G
    neurons, shared_experts S of them shared, the other R = G - S routed in N / R copies) and when it is exact
    (top_k a multiple of R, He et al. 2024) are in this module's docstring.
    probe: run dense and MoE on probe_texts / probe_input_ids (default: random tokens) and report max |dlogit|.
    The output is written to a temporary folder next to `out` and renamed when complete; an existing non-empty
    `out` is refused unless `overwrite`. Returns an `UpcycleReport`; config.upcycled_from records the recipe
    and `base_model` (default: the config's Hub id, a Hub-cache snapshot's repo id, else the source path).
    remote_code: also write hf_moe's modeling files and an `auto_map` into that folder (`hf_moe.hub.add_remote_code`,
    as `save_pretrained` does), so `out` loads with `trust_remote_code=True` where hf_moe is not installed.
    """
    start = time.perf_counter()
    parse_size(max_shard_size)
    check_output_dir(out, overwrite, src)
    recipe = UpcycleRecipe.build(recipe, **recipe_fields)
    with SourceCheckpoint(src) as source:
        require_floating_weights(source.keys(), source.dtype, str(src))
        dense_config = _dense_config(source)
        tokenizer = None
        if probe_texts and probe_input_ids is None:
            from transformers import AutoTokenizer

            if not tokenizer_files(src):
                raise ValueError(f"probe_texts need the source's tokenizer, but {str(src)!r} has no tokenizer files "
                                 f"({', '.join(TOKENIZER_FILES[:4])}, ...): save it there or pass probe_input_ids.")
            try:
                tokenizer = AutoTokenizer.from_pretrained(src)
            except (OSError, ValueError) as error:
                raise ValueError(f"probe_texts need the source's tokenizer, which did not load: {error}") from error
        batch = _probe_batch(recipe, dense_config.vocab_size, probe, probe_texts, probe_input_ids, tokenizer)
        with atomic_output_dir(out, overwrite, src) as tmp:
            writer = ShardedWriter(tmp, max_shard_size)
            config, report = _run(source.get, source.keys(), source.shape, dense_config, recipe, writer.add, batch,
                                  base_model or _base_name(source), progress, release=source.release)  # fmt: skip
            config.save_pretrained(tmp)
            if remote_code:
                add_remote_code(tmp)
            report.extra["side_files"] = copy_side_files(src, tmp)
            report.extra["remote_code"] = remote_code
            writer.finish()
    report.output, report.bytes_written = str(out), writer.total_size
    report.extra["largest_shard_bytes"] = writer.largest_shard
    report.seconds = time.perf_counter() - start
    logger.info("%s", report)
    return report


def _dense_config(source: SourceCheckpoint) -> PreTrainedConfig:
    model_type = source.config.get("model_type")
    try:
        return AutoConfig.from_pretrained(source.folder)
    except (KeyError, ValueError) as error:
        raise ValueError(f"Cannot upcycle {str(source.folder)!r}: unknown architecture model_type={model_type!r} "
                         f"({error}).") from error


def _base_name(source: SourceCheckpoint) -> str:
    """The base model to record: the config's Hub id, the id of a Hub-cache snapshot folder
    (.../models--org--name/snapshots/<hash>), else the source's absolute path."""
    named = str(source.config.get("_name_or_path") or "")
    if named and not Path(named).exists():
        return named
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$", source.folder.resolve().as_posix())
    return f"{match.group(1)}/{match.group(2)}" if match else str(source.folder.resolve())


def upcycle_model(dense_model: PreTrainedModel, recipe: UpcycleRecipe | None = None, *, probe: bool = True,
                  probe_texts: list[str] | None = None, probe_input_ids: list[list[int]] | torch.Tensor | None = None,
                  tokenizer: Any = None, **recipe_fields: Any) -> MoEForCausalLM:
    """In-memory `upcycle` (notebooks): a dense transformers causal LM -> MoEForCausalLM with the same function.
    Takes the recipe as `upcycle` does (a recipe and/or its fields as keywords); the report is attached as
    `model.upcycle_report`."""
    start = time.perf_counter()
    recipe = UpcycleRecipe.build(recipe, **recipe_fields)
    state = dense_model.state_dict()
    require_floating_weights(state, lambda key: state[key].dtype, type(dense_model).__name__)
    batch = _probe_batch(recipe, dense_model.config.vocab_size, probe, probe_texts, probe_input_ids, tokenizer)
    tensors: dict[str, torch.Tensor] = {}
    base = str(getattr(dense_model.config, "_name_or_path", "") or type(dense_model).__name__)
    config, report = _run(state.__getitem__, list(state), lambda k: tuple(state[k].shape), dense_model.config,
                          recipe, tensors.__setitem__, batch, base, progress=False)  # fmt: skip
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"upcycle_model built wrong keys: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.model.rotary_emb = RotaryEmbedding(config)
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, name, torch.zeros(buffer.shape, dtype=buffer.dtype))
    model.eval()
    report.seconds = time.perf_counter() - start
    model.upcycle_report = report
    return model


__all__ = ["UpcycleReport", "upcycle", "upcycle_model"]
