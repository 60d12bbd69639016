"""hf_moe.analysis: PNG heatmap and MaxVio curve, and the error when matplotlib is missing."""

from __future__ import annotations

import sys

import pytest
import torch

from hf_moe.analysis import max_vio_series, plot_expert_load, plot_max_vio
from hf_moe.training import ExpertLoads

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
