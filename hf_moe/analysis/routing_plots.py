"""PNG figures of the routing analyses: specialisation heatmaps, token-id concentration, co-activation,
drop rate by position, routing agreement over training. Each takes the result of one analysis function.

Needs matplotlib (`pip install 'hf-moe[plot]'`). Models with many MoE layers are drawn for at most
`MAX_LAYERS_DRAWN` layers, evenly spaced (first and last included); the report's tables hold all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .capacity import DropRates
from .coactivation import Coactivation
from .learning import RoutingAgreement
from .plots import matplotlib_figure, save_png
from .specialisation import GroupSpecialisation, TokenSpecialisation

MAX_LAYERS_DRAWN = 8


def drawn_layers(count: int, most: int = MAX_LAYERS_DRAWN) -> list[int]:
    """Indices of at most `most` layers out of `count`, evenly spaced, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def _label(axes: object, xlabel: str, ylabel: str, legend_size: int = 7, **legend: object) -> None:
    """Axis labels, a light grid and the legend of a line plot."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=legend_size, **legend)


def _ratio_norm(values: torch.Tensor) -> object:
    from matplotlib.colors import TwoSlopeNorm

    finite = values[values.isfinite()]
    top = float(finite.max()) if finite.numel() else 2.0
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, top))  # white = served like any token


def plot_group_specialisation(spec: GroupSpecialisation, path: str | Path, title: str, group_label: str) -> Path:
    """Heatmap per layer: share of each group's tokens sent to each expert / the expert's overall share."""
    Figure, Canvas = matplotlib_figure()
    layers = drawn_layers(len(spec.layers))
    groups, experts = spec.ratio.shape[1], spec.ratio.shape[2]
    row_height = 0.28 * groups + 0.7
    figure = Figure(figsize=(max(6.5, 0.33 * experts + 3.0), 0.6 + row_height * len(layers)), layout="constrained")
    axes_list = figure.subplots(len(layers), 1, squeeze=False)[:, 0]
    norm = _ratio_norm(spec.ratio[layers])
    image = None
    for axes, layer in zip(axes_list, layers):
        image = axes.imshow(spec.ratio[layer].numpy(), aspect="auto", cmap="RdBu_r", norm=norm)
        axes.set_yticks(range(groups), spec.groups, fontsize=7)
        axes.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=6)
        axes.set_ylabel(group_label, fontsize=7)
        axes.set_title(f"{spec.layers[layer]}: specialisation score {spec.score[layer]:.3f}", fontsize=8)
    axes_list[-1].set_xlabel("expert")
    figure.suptitle(title, fontsize=10)
    figure.colorbar(image, ax=list(axes_list), label="share of group's tokens / overall share", shrink=0.8)
    return save_png(figure, Canvas, path)


def plot_token_specialisation(spec: TokenSpecialisation, path: str | Path, bins: int = 10) -> Path:
    """Left: per layer, the token-id specialisation score and the routing share a token-id table explains
    (rescaled, 0 = chance). Right: distribution of the per-token-id mode share, occurrence-weighted."""
    Figure, Canvas = matplotlib_figure()
    figure = Figure(figsize=(11.0, 4.0), layout="constrained")
    left, right = figure.subplots(1, 2)
    x = torch.arange(len(spec.layers)).float()
    left.bar((x - 0.2).tolist(), spec.score, width=0.4, label="token-id specialisation score")
    left.bar((x + 0.2).tolist(), spec.explained_score, width=0.4, label="routing explained by token id")
    left.set_xticks(x.tolist(), spec.layers, fontsize=7, rotation=45 if len(spec.layers) > 8 else 0)
    left.set_ylim(min(0.0, *[v for v in spec.score + spec.explained_score if v == v]) - 0.02, 1.0)
    left.axhline(0, color="black", linewidth=0.6)
    left.set_ylabel("0 = independent of token id, 1 = fixed by token id")
    left.legend(fontsize=7)
    left.grid(axis="y", alpha=0.3)
    hist = spec.mode_share_histogram(bins)
    centres = ((torch.arange(bins) + 0.5) / bins).tolist()
    for layer in drawn_layers(len(spec.layers)):
        right.plot(centres, hist[layer].tolist(), marker=".", label=spec.layers[layer])
    _label(right, "share of a token id's occurrences on its most frequent expert set", "fraction of token occurrences")
    figure.suptitle(f"Token-id specialisation ({spec.distinct_tokens} token ids with >= {spec.min_count} occurrences)",
                    fontsize=10)
    return save_png(figure, Canvas, path)


def plot_coactivation(co: Coactivation, path: str | Path) -> Path:
    """Heatmap per layer of log2 lift: how much more often two experts serve one token than independent
    choices would (0 = as often, +1 = twice; lifts beyond 1/16 and 16, e.g. never together, are drawn at the
    ends of the scale; the diagonal is blank)."""
    from matplotlib.colors import TwoSlopeNorm

    Figure, Canvas = matplotlib_figure()
    layers = drawn_layers(len(co.layers))
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    figure = Figure(figsize=(3.4 * cols + 1.0, 3.2 * rows + 0.6), layout="constrained")
    grid = figure.subplots(rows, cols, squeeze=False)
    log_lift = torch.log2(co.lift[layers].clamp(min=1 / 16, max=16))  # "never together" drawn as 1/16
    finite = log_lift[log_lift.isfinite()]
    bound = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    norm = TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)
    image = None
    for slot, axes in enumerate(grid.reshape(-1)):
        if slot >= len(layers):
            axes.axis("off")
            continue
        image = axes.imshow(log_lift[slot].numpy(), cmap="PuOr_r", norm=norm)
        axes.set_title(co.layers[layers[slot]], fontsize=8)
        axes.set_xlabel("expert", fontsize=7)
        axes.set_ylabel("expert", fontsize=7)
        axes.tick_params(labelsize=6)
    figure.suptitle("Co-activation: log2 lift of choosing two experts for one token", fontsize=10)
    figure.colorbar(image, ax=grid.reshape(-1).tolist(), label="log2 lift (0 = independent choices)", shrink=0.8)
    return save_png(figure, Canvas, path)


def plot_drop_rates(drops: Sequence[DropRates], path: str | Path) -> Path:
    """Drop rate (dropped / routed slots) by position bucket, one colour per layer, one line style per
    capacity grouping (solid: the first of `drops`, e.g. one batch; dashed: the next, e.g. one sequence)."""
    Figure, Canvas = matplotlib_figure()
    figure = Figure(figsize=(7.5, 4.0), layout="constrained")
    axes = figure.add_subplot()
    x = list(range(len(drops[0].buckets)))
    for layer in drawn_layers(len(drops[0].layers)):
        color = None
        for d, style in zip(drops, ("-", "--", ":")):
            line = axes.plot(x, (100 * d.rates[layer]).tolist(), style, marker="o" if style == "-" else ".",
                             color=color, label=f"{d.layers[layer]}, groups: one {d.group_by}")[0]
            color = line.get_color()
    axes.set_xticks(x, drops[0].buckets, fontsize=7, rotation=30)
    axes.set_ylim(bottom=0)
    _label(axes, "position in the sequence", "slots dropped (%)", 6, ncol=2)
    axes.set_title(f"Drops by position at capacity factor {drops[0].capacity_factor:g}", fontsize=10)
    return save_png(figure, Canvas, path)


def plot_routing_agreement(agreement: RoutingAgreement, path: str | Path) -> Path:
    """Per layer: fraction of tokens whose expert set equals the final checkpoint's, over the checkpoints."""
    Figure, Canvas = matplotlib_figure()
    figure = Figure(figsize=(7.5, 4.0), layout="constrained")
    axes = figure.add_subplot()
    by_step = all(step is not None for step in agreement.steps)
    x = agreement.steps if by_step else list(range(1, len(agreement.checkpoints) + 1))
    for layer in drawn_layers(len(agreement.layers)):
        axes.plot(x, agreement.agreement[:, layer].tolist(), marker="o", label=f"{agreement.layers[layer]} (same set)")
        axes.plot(x, agreement.overlap[:, layer].tolist(), linestyle="--", linewidth=0.8, color=axes.lines[-1].get_color(),
                  label=f"{agreement.layers[layer]} (experts shared)")
    axes.set_ylim(0, 1.02)
    _label(axes, "training step" if by_step else "checkpoint", "agreement with the final checkpoint", 6, ncol=2)
    axes.set_title("Early routing learning", fontsize=10)
    return save_png(figure, Canvas, path)
