"""Pictures of expert balance: a load heatmap (MoE layers x experts), the per-layer balance summary (dead experts,
routing entropy against log N, load percentile bands: the `moe/` metrics MoECallback logs, here over the analysed
data) and MaxVio over training steps, as PNG, and the matplotlib helpers every analysis plot uses (`routing_plots`).

Needs matplotlib (`pip install 'hf-moe[plot]'`); everything else in hf_moe works without it.

    from hf_moe.analysis import plot_expert_load, plot_max_vio
    plot_expert_load(hf_moe.training.expert_load(model, eval_loader), "load.png")
    plot_max_vio(trainer.state.log_history, "max_vio.png")   # the `moe/max_vio*` keys MoECallback logs
    plot_load_balance(load_balance(trace), "balance.png")      # hf_moe.analysis.load_balance of a RoutingTrace
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..training.balancing import ExpertLoads, max_violation
from .balance import LoadBalance


def matplotlib_figure() -> Any:
    """matplotlib's Figure class and Agg canvas, or an ImportError naming the `plot` extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "hf_moe.analysis draws with matplotlib, which is not installed: pip install 'hf-moe[plot]' "
            "(or pip install matplotlib)."
        ) from error
    return Figure, FigureCanvasAgg


def save_png(figure: Any, canvas_class: Any, path: str | Path) -> Path:
    """Write `figure` as a PNG at `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas_class(figure)
    figure.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_expert_load(
    loads: ExpertLoads | torch.Tensor,
    path: str | Path,
    labels: Sequence[str] | None = None,
    title: str = "Expert load",
) -> Path:
    """Heatmap of load_i / mean load (1 = perfectly balanced) per MoE layer (rows) and expert (columns), each
    row labelled with its MaxVio. `loads`: ExpertLoads (e.g. from `expert_load`) or a (layers, experts)
    tensor. Returns the PNG path."""
    Figure, Canvas = matplotlib_figure()
    if isinstance(loads, ExpertLoads):
        labels = labels or loads.labels
        loads = loads.loads
    loads = torch.as_tensor(loads, dtype=torch.float32).cpu()
    if loads.dim() != 2 or loads.numel() == 0:
        raise ValueError(f"plot_expert_load: loads must be a non-empty (layers, experts) table, got {tuple(loads.shape)}.")
    labels = list(labels or [f"layer {i}" for i in range(loads.shape[0])])
    used = loads.sum(dim=-1) > 0  # routers that saw no token (e.g. MTP blocks at inference) are left out
    if not used.any():
        raise ValueError("plot_expert_load: no router saw any token.")
    loads, labels = loads[used], [name for name, keep in zip(labels, used.tolist()) if keep]
    relative = loads / loads.mean(dim=-1, keepdim=True).clamp(min=1e-12)
    vio = max_violation(loads).tolist()
    height = 1.2 + 0.45 * loads.shape[0]
    figure = Figure(figsize=(max(6.0, 0.32 * loads.shape[1] + 2.5), height))
    axes = figure.add_subplot()
    from matplotlib.colors import TwoSlopeNorm

    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(relative.max())))  # white = balanced
    image = axes.imshow(relative.numpy(), aspect="auto", cmap="RdBu_r", norm=norm)
    axes.set_xlabel("expert")
    axes.set_yticks(range(len(labels)), [f"{name}  (MaxVio {v:.2f})" for name, v in zip(labels, vio)])
    axes.set_xticks(range(loads.shape[1]), [str(i) for i in range(loads.shape[1])], fontsize=7)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="load / mean load")
    return save_png(figure, Canvas, path)


def _percent_name(q: float) -> str:
    return f"p{100 * q:g}"


def plot_load_balance(balance: LoadBalance, path: str | Path, title: str = "Load balance per MoE layer") -> Path:
    """Three panels over the MoE layers of `balance` (`load_balance`: the numbers come from hf_moe.training's
    `dead_experts`, `routing_entropy` and `load_percentiles`, nothing is recomputed here): the fraction of dead
    experts (no token), the mean routing entropy with log N (a uniform router distribution) marked, and bands of
    the load percentiles (load / mean load; each pair of quantiles q, 1 - q one band, the median a line, 1 = a
    fair share). Layers without tokens (NaN) are left blank. Returns the PNG path."""
    Figure, Canvas = matplotlib_figure()
    layers = list(balance.layers)
    if not layers:
        raise ValueError("plot_load_balance: the balance summary has no MoE layer.")
    x = list(range(len(layers)))
    num_experts = balance.loads.shape[-1]
    figure = Figure(figsize=(min(24.0, max(11.0, 1.05 * len(layers) + 3.0)), 3.8), layout="constrained")
    dead_axes, entropy_axes, load_axes = figure.subplots(1, 3, sharex=True)

    dead_axes.bar(x, balance.dead, color="tab:red", width=0.7)
    dead_axes.set_ylim(0, max(0.05, 1.1 * max((d for d in balance.dead if d == d), default=0.0)))  # NaN != NaN
    dead_axes.set_ylabel("fraction of experts with no token")
    dead_axes.set_title("Dead experts", fontsize=9)

    entropy_axes.plot(x, balance.entropy, marker="o", color="tab:blue", label="mean routing entropy")
    if num_experts > 1:
        log_n = math.log(num_experts)
        entropy_axes.axhline(log_n, color="black", linestyle="--", linewidth=1.0, label=f"log N = {log_n:.2f} (uniform)")
        entropy_axes.set_ylim(0, 1.08 * log_n)
    entropy_axes.set_ylabel("entropy (nats)")
    entropy_axes.set_title("Routing entropy vs log N", fontsize=9)
    entropy_axes.legend(fontsize=7, loc="lower right")

    quantiles, bands = list(balance.quantiles), balance.percentiles.float()  # (L, Q)
    pairs = [(i, len(quantiles) - 1 - i) for i in range(len(quantiles) // 2)]  # outermost first
    for depth, (lo, hi) in enumerate(pairs):
        load_axes.fill_between(x, bands[:, lo].tolist(), bands[:, hi].tolist(), color="tab:green",
                               alpha=0.18 + 0.5 * depth / max(1, len(pairs)), linewidth=0,
                               label=f"{_percent_name(quantiles[lo])}-{_percent_name(quantiles[hi])}")
    if len(quantiles) % 2:
        middle = len(quantiles) // 2
        load_axes.plot(x, bands[:, middle].tolist(), marker=".", color="darkgreen",
                       label=_percent_name(quantiles[middle]))
    load_axes.axhline(1.0, color="black", linestyle="--", linewidth=1.0, label="fair share")
    load_axes.set_ylim(bottom=0)
    load_axes.set_ylabel("load / mean load")
    load_axes.set_title("Load percentiles over the experts", fontsize=9)
    load_axes.legend(fontsize=7)

    for axes in (dead_axes, entropy_axes, load_axes):
        axes.set_xticks(x, layers, fontsize=7, rotation=45 if len(layers) > 6 else 0)
        axes.set_xlabel("MoE layer")
        axes.grid(alpha=0.3)
    figure.suptitle(f"{title} ({num_experts} routed experts)", fontsize=10)
    return save_png(figure, Canvas, path)


def max_vio_series(log_history: Sequence[Mapping[str, Any]], prefix: str = "moe/max_vio") -> dict[str, list]:
    """From a Trainer log history: {"mean" or layer label: [(step, MaxVio), ...]} for every `moe/max_vio*`
    key (the eval keys `moe/eval_max_vio*` with prefix="moe/eval_max_vio")."""
    series: dict[str, list] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key == prefix or key.startswith(prefix + "/"):
                name = "mean" if key == prefix else key[len(prefix) + 1:]
                if isinstance(value, (int, float)) and not math.isnan(value):
                    series.setdefault(name, []).append((entry.get("step", len(series.get(name, []))), float(value)))
    return series


def plot_max_vio(
    history: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path,
    title: str = "MaxVio during training",
    per_layer: bool = True,
) -> Path:
    """MaxVio over training steps: the mean over MoE layers (bold) and, if `per_layer`, each layer (thin).
    `history`: a Trainer log history (`trainer.state.log_history`) or {name: [(step, value), ...]}."""
    Figure, Canvas = matplotlib_figure()
    series = dict(history) if isinstance(history, Mapping) else max_vio_series(history)
    if not series:
        raise ValueError("plot_max_vio: no MaxVio values found (expected `moe/max_vio` keys from MoECallback).")
    figure = Figure(figsize=(7.0, 4.0))
    axes = figure.add_subplot()
    for name, points in sorted(series.items(), key=lambda item: item[0] != "mean"):
        if name != "mean" and not per_layer:
            continue
        steps, values = zip(*points)
        if name == "mean":
            axes.plot(steps, values, color="black", linewidth=2.2, label="mean over MoE layers")
        else:
            axes.plot(steps, values, linewidth=0.9, alpha=0.7, label=name)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("MaxVio = max load / mean load - 1")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.set_title(title)
    axes.legend(fontsize=7, ncol=2)
    return save_png(figure, Canvas, path)
