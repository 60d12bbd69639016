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
from .dense import dense_global_shapes, dense_layer_shapes, moe_fields_from_dense
from .probe import LayerwiseRunner, ProbeBatch, compare_logits
from .upcycle_recipe import (
    UpcycleRecipe,
    build_moe_config,
    invalid_argument,
    neuron_activity,
    neuron_partition,
    router_rows,
    upcycle_ffn,
)

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
def _check_keys(keys: list[str], shape: Callable[[str], tuple[int, ...]], fields: dict[str, Any], family: str) -> None:
    """Every key the dense family needs, with its shape, and nothing else (clear errors before any output)."""
    expected = dict(dense_global_shapes(fields))
    layer_shapes = dense_layer_shapes(fields)
    for i in range(fields["num_hidden_layers"]):
        expected.update({f"model.layers.{i}.{k}": s for k, s in layer_shapes.items()})
    present = set(keys)
    ignorable = {"lm_head.weight"} if fields["tie_word_embeddings"] else set()
    missing = [k for k in expected if k not in present]
    unexpected = [k for k in keys if k not in expected and k not in ignorable and not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise CheckpointError(f"The {family} checkpoint lacks {len(missing)} tensors its config implies, e.g. "
                              f"{missing[:4]}.")
    if unexpected:
        raise CheckpointError(f"The {family} checkpoint has {len(unexpected)} tensors upcycling does not know, e.g. "
                              f"{unexpected[:4]} (is config.json the checkpoint's own?).")
    for key, want in expected.items():
        if tuple(shape(key)) != tuple(want):
            raise CheckpointError(f"Shape mismatch for {key!r}: the {family} config implies {tuple(want)}, the "
                                  f"checkpoint has {tuple(shape(key))}.")


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
    fields = moe_fields_from_dense(dense_config)
    recipe.check(fields["intermediate_size"])
    family = dense_config.model_type
    _check_keys(keys, shape, fields, family)
    config = build_moe_config(fields, recipe, base_model, family)
    if recipe.router_init == "hidden" and (batch is None or batch.input_ids.shape[0] < recipe.copies):
        raise invalid_argument("router_init", "hidden", f"needs at least one probe text per copy ({recipe.copies} copies)")
    dtype = get("model.norm.weight").dtype
    report = UpcycleReport(output=None, recipe=config.upcycled_from, base_model=base_model, base_model_type=family,
                           expected_exact=False, why_not_exact=recipe.exactness_issues(dtype))  # fmt: skip
    report.expected_exact = not report.why_not_exact
    dense = moe = None
    if batch is not None:
        dense, moe = LayerwiseRunner(dense_config, batch, "dense"), LayerwiseRunner(config, batch, "moe")
    embed = get("model.embed_tokens.weight")
    emit("model.embed_tokens.weight", embed)
    if dense is not None:
        dense.embed(embed)
        moe.embed(embed)
    del embed
    needs_activity = recipe.shared_selection == "active" and recipe.shared_experts > 0
    for i in tqdm(range(config.num_hidden_layers), desc="upcycling layers", disable=not progress):
        prefix = f"model.layers.{i}."
        tensors = {k: get(prefix + k) for k in dense_layer_shapes(fields)}
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
    norm = get("model.norm.weight")
    emit("model.norm.weight", norm)
    head = get("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
    if not config.tie_word_embeddings:
        emit("lm_head.weight", head)
    if dense is not None:
        report.max_abs_logit_diff, report.max_abs_logit = compare_logits(dense, moe, norm, head)
        report.probe_tokens = int(batch.attention_mask.sum())
    counts = count_parameters(config)
    report.params_total, report.params_active = counts.total, counts.active
    report.params_dense = sum(math.prod(shape(k)) for k in keys if k != "lm_head.weight" or not config.tie_word_embeddings)
    if report.expected_exact and report.max_abs_logit_diff is not None and not report.exact:
        report.why_not_exact.append(f"measured max |dlogit| {report.max_abs_logit_diff:.3g} exceeds the fp32 tolerance "
                                    "although the recipe is exact (please report this)")  # fmt: skip
        logger.warning("Upcycled model differs from the dense model: %s", report.why_not_exact[-1])
    config.upcycled_from = {**config.upcycled_from, "function_preservation": {
        "exact": report.exact, "max_abs_logit_diff": report.max_abs_logit_diff, "probe_tokens": report.probe_tokens,
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
    *,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    shared_experts: int = 0,
    strategy: str | None = "auto",
    scoring_func: str = "sigmoid",
    router_init: str = "random",
    drop_ratio: float = 0.0,
    shared_selection: str = "first",
    shared_expert_gate: bool = False,
    scale_on: str = "down_proj",
    n_group: int = 1,
    topk_group: int = 1,
    first_k_dense_replace: int = 0,
    moe_layer_freq: int = 1,
    router_bias_update_rate: float = 1e-3,
    probe: bool = True,
    probe_texts: list[str] | None = None,
    probe_input_ids: list[list[int]] | torch.Tensor | None = None,
    overwrite: bool = False,
    seed: int = 0,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    base_model: str | None = None,
) -> UpcycleReport:
    """Upcycle the dense checkpoint folder `src` (Llama, Mistral, Qwen2, Qwen3; safetensors) into an hf_moe
    checkpoint at `out`, streaming one decoder layer at a time (peak memory ~ one output shard + one layer).

    num_experts / top_k: routed experts N and experts per token K. granularity G: the FFN is cut into G shards
    of intermediate_size / G neurons (the expert width); shared_experts S of them become shared experts, the
    other R = G - S are routed, N / R copies of them. Exact (He et al. 2024) iff top_k is a multiple of R
    (whole copies are chosen); the factor R goes on the routed down_proj (`scale_on`) or on
    routed_scaling_factor. strategy: "copy" (G = 1, Komatsuzaki et al. 2022), "virtual-group",
    "drop-upcycling" (re-draw `drop_ratio` of each expert, Nakamura et al. 2025) or "auto" (from the other
    arguments; None means "auto"). router_init: "random" | "zero" | "hidden" (needs >= one probe text per copy).
    shared_selection: "first" shards or the "active" neurons (mean |activation| on the probe batch).
    n_group/topk_group, first_k_dense_replace/moe_layer_freq, router_bias_update_rate: as in MoEConfig.
    probe: run dense and MoE on probe_texts / probe_input_ids (default: random tokens) and report max |dlogit|.
    The output is written to a temporary folder next to `out` and renamed when complete; an existing non-empty
    `out` is refused unless `overwrite`. Returns an `UpcycleReport`; config.upcycled_from records the recipe
    and `base_model` (default: the config's Hub id, a Hub-cache snapshot's repo id, else the source path).
    """
    start = time.perf_counter()
    parse_size(max_shard_size)
    check_output_dir(out, overwrite, src)
    recipe = UpcycleRecipe(
        num_experts=num_experts, top_k=top_k, granularity=granularity, shared_experts=shared_experts,
        strategy=strategy or "auto", scoring_func=scoring_func, router_init=router_init, drop_ratio=drop_ratio,
        shared_selection=shared_selection, shared_expert_gate=shared_expert_gate, scale_on=scale_on,
        n_group=n_group, topk_group=topk_group, first_k_dense_replace=first_k_dense_replace,
        moe_layer_freq=moe_layer_freq, router_bias_update_rate=router_bias_update_rate, seed=seed,
    )  # fmt: skip
    with SourceCheckpoint(src) as source:
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
            report.extra["side_files"] = copy_side_files(src, tmp)
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


def upcycle_model(dense_model: PreTrainedModel, *, num_experts: int, top_k: int, probe: bool = True,
                  probe_texts: list[str] | None = None, probe_input_ids: list[list[int]] | torch.Tensor | None = None,
                  tokenizer: Any = None, **recipe_kwargs: Any) -> MoEForCausalLM:
    """In-memory `upcycle` (notebooks): a dense transformers causal LM -> MoEForCausalLM with the same function.
    Takes the recipe arguments of `upcycle`; the report is attached as `model.upcycle_report`."""
    start = time.perf_counter()
    recipe = UpcycleRecipe(num_experts=num_experts, top_k=top_k, **recipe_kwargs)
    state = dense_model.state_dict()
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
