"""`analyze`: the whole routing analysis of one model on local text files, as PNGs and one report.

    from hf_moe.analysis import analyze
    result = analyze("outputs/demo/final", ["code.txt", "prose.txt"], output_dir="outputs/analysis",
                     checkpoints=["outputs/demo/trainer/checkpoint-25", ...])

What `hf-moe analyze MODEL --data A.txt B.txt [--checkpoints C1 C2 ...]` calls. Every input is checked
(data files, model, checkpoints' architecture) before the first forward.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .balance import load_balance
from .capacity import drop_rate_by_position
from .coactivation import coactivation
from .data import TokenSequence, check_text_file, file_sequences
from .learning import routing_agreement
from .loading import check_same_architecture, checkpoint_step, load_moe_config, load_moe_model, load_tokenizer
from .report import RoutingAnalysis, write_report
from .specialisation import domain_specialisation, position_specialisation, token_id_specialisation
from .trace import RoutingTrace, trace_routing

WHAT_IF_CAPACITY_FACTOR = 1.25  # drops of a dropless model are replayed at this factor (Switch Transformer's)
DEFAULT_MAX_TOKENS = 20_000
DEFAULT_SEQ_LEN = 256


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """File names, with parent folders added where two files share a name."""
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


def _sequences(files: Sequence[Path], tokenizer: Any, seq_len: int, max_tokens: int | None) -> list[TokenSequence]:
    return [seq for domain, path in enumerate(files) for seq in file_sequences(path, domain, tokenizer, seq_len, max_tokens)]


def _trace(model: torch.nn.Module, sequences: list[TokenSequence], names: list[str], batch_size: int,
           pad_id: int | None, progress: bool, what: str) -> RoutingTrace:
    total = sum(s.input_ids.numel() - s.prefix for s in sequences)
    if progress:
        print(f"tracing {what}: {len(sequences)} sequences, {total} tokens")
    return trace_routing(model, sequences, names, batch_size=batch_size, keep_probabilities=False,
                         pad_token_id=pad_id, progress=progress, total_tokens=total)


def analyze(
    model: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike = "outputs/analysis",
    checkpoints: Sequence[str | os.PathLike] = (),
    capacity_factor: float | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    seq_len: int | None = None,
    batch_size: int = 8,
    num_buckets: int = 8,
    min_count: int = 5,
    tokenizer: str | os.PathLike | None = None,
    device: str = "cpu",
    plots: bool = True,
    progress: bool = True,
) -> RoutingAnalysis:
    """Trace `model` on the `data` files (one domain each; at most `max_tokens` tokens per file, in sequences
    of `seq_len` tokens, default min(256, the model's max positions)), run every analysis, write the PNGs
    (`plots`; needs matplotlib), `report.md` and `analysis.json` into `output_dir`, and return the results.
    `checkpoints`: earlier checkpoints of the same run, for early routing learning (sorted by training step
    when every one has a step: a `checkpoint-{step}` name or a trainer_state.json; else in the order given).
    `capacity_factor`: for the drop analysis (default: the model's; 1.25 as a what-if for dropless models)."""
    if not data:
        raise ValueError("no data given: pass the text files to analyse (--data A.txt [B.txt ...]), one per domain.")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: it must be > 0.")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid: it must be >= 1.")
    if batch_size < 1 or num_buckets < 1:
        raise ValueError(f"batch_size={batch_size} and num_buckets={num_buckets} must be >= 1.")
    if plots:
        from .plots import matplotlib_figure

        matplotlib_figure()  # the ImportError naming the plot extra, before any work
    files = [check_text_file(path) for path in data]
    config = load_moe_config(model)  # configs first: a mismatch fails before any weight is read
    for checkpoint in checkpoints:
        check_same_architecture(config, load_moe_config(checkpoint), str(checkpoint))
    tok = load_tokenizer(tokenizer or model)
    loaded = load_moe_model(model, device=device)
    config = loaded.config
    max_positions = getattr(config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, max_positions)
    if seq_len > max_positions:
        raise ValueError(f"seq_len={seq_len} is longer than the model's max_position_embeddings={max_positions}.")
    names = _unique_names(files)
    sequences = _sequences(files, tok, seq_len, max_tokens)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else config.pad_token_id
    trace = _trace(loaded.model, sequences, names, batch_size, pad_id, progress, str(model))

    notes: dict[str, str] = {}
    factor = capacity_factor if capacity_factor is not None else trace.capacity_factor
    if capacity_factor is not None and capacity_factor != trace.capacity_factor:
        own = "dropless" if trace.capacity_factor is None else f"capacity factor {trace.capacity_factor:g}"
        notes["drops"] = f"given; what-if: the model itself is {own}"
    if factor is None:
        factor = WHAT_IF_CAPACITY_FACTOR
        notes["drops"] = f"what-if: the model is dropless; {WHAT_IF_CAPACITY_FACTOR:g} is Switch Transformer's factor"
    agreement = None
    if checkpoints:
        steps = [checkpoint_step(c) for c in checkpoints]
        if None not in steps:  # training order (a shell glob puts checkpoint-100 before checkpoint-25)
            steps, checkpoints = map(list, zip(*sorted(zip(steps, checkpoints), key=lambda pair: pair[0])))
        traces = []
        for checkpoint in checkpoints:
            other = load_moe_model(checkpoint, device=device)
            traces.append(_trace(other.model, sequences, names, batch_size, pad_id, progress, str(checkpoint)))
            del other
        agreement = routing_agreement(trace, traces, [str(c) for c in checkpoints], steps)
    else:
        notes["learning"] = "no checkpoints given (--checkpoints C1 C2 ..., earlier checkpoints of the same run)"
    domain = domain_specialisation(trace) if len(files) > 1 else None
    if domain is None:
        notes["domain"] = "needs at least two data files (one per domain)"
    token = token_id_specialisation(trace, min_count=min_count)
    shown = {tok_id for layer in token.top_tokens for expert in layer for tok_id, _, _ in expert}
    result = RoutingAnalysis(
        model=str(model), source=loaded.source, num_experts=trace.num_experts, top_k=trace.top_k, layers=trace.layers,
        domains=names, tokens_per_domain=torch.bincount(trace.domains, minlength=len(files)).tolist(),
        seq_len=seq_len, balance=load_balance(trace), domain=domain,
        position=position_specialisation(trace, num_buckets, length=seq_len), token=token,
        token_strings={t: tok.decode([t]) for t in sorted(shown)}, coactivation=coactivation(trace),
        drops=[drop_rate_by_position(trace, factor, num_buckets, length=seq_len, group_by=group)
               for group in ("batch", "sequence")], agreement=agreement, notes=notes,
    )
    output_dir = Path(output_dir)
    if plots:
        result.plots = draw_plots(result, output_dir)
    report = write_report(result, output_dir)
    if progress:
        print(f"report: {report}")
    return result


def draw_plots(result: RoutingAnalysis, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Every plot of `result` as a PNG in `output_dir`: {key: path}."""
    from . import routing_plots as rp
    from .plots import plot_expert_load, plot_load_balance

    out = Path(output_dir)
    plots = {
        "load": plot_expert_load(result.balance.loads, out / "expert_load.png", labels=result.balance.layers,
                                 title="Expert load on the analysed data"),
        "balance": plot_load_balance(result.balance, out / "balance_summary.png",
                                     title="Load balance on the analysed data"),
        "token": rp.plot_token_specialisation(result.token, out / "token_specialisation.png"),
        "position": rp.plot_group_specialisation(result.position, out / "position_specialisation.png",
                                                 "Expert load by position", "position"),
        "coactivation": rp.plot_coactivation(result.coactivation, out / "coactivation.png"),
        "drops": rp.plot_drop_rates(result.drops, out / "drops_by_position.png"),
    }
    if result.domain is not None:
        plots["domain"] = rp.plot_group_specialisation(result.domain, out / "domain_specialisation.png",
                                                       "Domain specialisation", "domain")
    if result.agreement is not None:
        plots["learning"] = rp.plot_routing_agreement(result.agreement, out / "early_routing_learning.png")
    return plots

