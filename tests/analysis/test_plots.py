"""hf_moe.analysis: PNG heatmap, balance summary and MaxVio curve, and the error when matplotlib is missing."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from hf_moe.analysis import load_balance, max_vio_series, plot_expert_load, plot_load_balance, plot_max_vio
from hf_moe.analysis import plots as plots_module
from hf_moe.training import ExpertLoads, dead_experts, load_percentiles

from .conftest import random_trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTORY = [
    {"loss": 5.0, "moe/max_vio": 2.0, "moe/max_vio/layer_1": 2.5, "moe/max_vio/layer_2": 1.5, "step": 1},
    {"loss": 4.0, "moe/max_vio": 1.0, "moe/max_vio/layer_1": 1.2, "moe/max_vio/layer_2": 0.8, "step": 2},
    {"eval_loss": 4.5, "moe/eval_max_vio": 0.7, "step": 2},
    {"loss": 3.5, "moe/max_vio": 0.5, "moe/max_vio/layer_1": 0.6, "moe/max_vio/layer_2": 0.4, "step": 3},
]


def test_expert_load_heatmap_is_written_as_png(tmp_path) -> None:
    loads = ExpertLoads(["model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "mtp.0.block.mlp.gate"],
                        torch.tensor([[10.0, 2, 3, 1], [4.0, 4, 4, 4], [0.0, 0, 0, 0]]))
    path = plot_expert_load(loads, tmp_path / "sub" / "load.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 2000
    tensor_path = plot_expert_load(torch.rand(3, 16) * 100, tmp_path / "load2.png")
    assert tensor_path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="no router saw any token"):
        plot_expert_load(torch.zeros(2, 4), tmp_path / "none.png")


def test_balance_summary_draws_the_shared_metrics_per_layer(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = random_trace(tokens=6, layers=2, experts=4, top_k=2)
    trace.topk_ids[0] = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [0, 2]])  # expert 3 dead
    trace.topk_ids[1] = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]])  # balanced
    trace.entropy = torch.tensor([[0.2, 0.4, 0.6, 0.2, 0.4, 0.6], [1.3, 1.3, 1.3, 1.3, 1.3, 1.3]])
    balance = load_balance(trace)
    drawn = []
    real_save = plots_module.save_png
    monkeypatch.setattr(plots_module, "save_png", lambda figure, *a: drawn.append(figure) or real_save(figure, *a))
    path = plot_load_balance(balance, tmp_path / "balance.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 2000

    dead_axes, entropy_axes, load_axes = drawn[0].axes
    expected_dead = dead_experts(balance.loads).tolist()
    assert expected_dead == [0.25, 0.0]
    assert [bar.get_height() for bar in dead_axes.patches] == pytest.approx(expected_dead)
    entropy_line, log_n_line = entropy_axes.lines
    assert list(entropy_line.get_ydata()) == pytest.approx([0.4, 1.3])
    assert list(log_n_line.get_ydata()) == pytest.approx([math.log(4)] * 2)
    percentiles = load_percentiles(balance.loads, balance.quantiles).double()  # (2 layers, p0 p10 p50 p90 p100)
    bands = [collection.get_paths()[0].vertices[:, 1] for collection in load_axes.collections]  # p0-p100, p10-p90
    assert len(bands) == 2
    for band, (lo, hi) in zip(bands, ((0, 4), (1, 3))):  # a band's outline runs along both of its quantiles
        assert set(band.round(5).tolist()) == set(percentiles[:, [lo, hi]].reshape(-1).numpy().round(5).tolist())
    median, fair = load_axes.lines
    assert list(median.get_ydata()) == pytest.approx(percentiles[:, 2].tolist()) and list(fair.get_ydata()) == [1, 1]
    labels = [text.get_text() for text in load_axes.get_legend().get_texts()]
    assert labels == ["p0-p100", "p10-p90", "p50", "fair share"]


def test_max_vio_series_and_curve(tmp_path) -> None:
    series = max_vio_series(HISTORY)
    assert series == {"mean": [(1, 2.0), (2, 1.0), (3, 0.5)], "layer_1": [(1, 2.5), (2, 1.2), (3, 0.6)],
                      "layer_2": [(1, 1.5), (2, 0.8), (3, 0.4)]}
    assert max_vio_series(HISTORY, prefix="moe/eval_max_vio") == {"mean": [(2, 0.7)]}
    path = plot_max_vio(HISTORY, tmp_path / "vio.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 2000
    with pytest.raises(ValueError, match="no MaxVio values"):
        plot_max_vio([{"loss": 1.0}], tmp_path / "empty.png")


def test_missing_matplotlib_names_the_plot_extra(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(ImportError, match=r"hf-moe\[plot\]"):
        plot_max_vio(HISTORY, tmp_path / "vio.png")
    with pytest.raises(ImportError, match=r"hf-moe\[plot\]"):
        plot_expert_load(torch.ones(2, 4), tmp_path / "load.png")
    with pytest.raises(ImportError, match=r"hf-moe\[plot\]"):
        plot_load_balance(load_balance(random_trace(tokens=8, layers=1)), tmp_path / "balance.png")
