"""Two processes (torchrun, gloo, CPU): HF Trainer with DDP, and a plain loop with FSDP2, both under the ESFT
recipe with bias balancing on. Biases are identical on both ranks and equal to a one-process run with the same
global batch; frozen expert slices stay bit-identical; trained ones agree with the one-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_moe.kernels.cpu import gemm
from tests.training.ddp_worker import SELECTION

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = WORKER.parents[2]


def run(command: list[str], out: Path, gemm_name: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([*command, str(WORKER), str(out), "--gemm", gemm_name], cwd=out, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module", params=["aten", "onednn"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's runs with the fast paths' products on torch.mm, and on oneDNN (LinearFunction, the padded
    fused experts) under DDP and FSDP2."""
    if request.param == "onednn" and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    out = tmp_path_factory.mktemp(f"ddp-{request.param}")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], out, request.param)
    run([sys.executable], out, request.param)
    return out


def load(out: Path, mode: str, world: int, rank: int) -> dict:
    return torch.load(out / f"{mode}-world{world}-rank{rank}.pt")


def biases(state: dict) -> dict[str, torch.Tensor]:
    return {name: t for name, t in state.items() if name.endswith("e_score_correction_bias")}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trainer", "fsdp2"])
def test_two_processes_match_one(runs: Path, mode: str) -> None:
    rank0, rank1 = load(runs, mode, 2, 0), load(runs, mode, 2, 1)
    single = load(runs, mode, 1, 0)
    initial = single["initial"]

    moved = 0
    for name, bias in biases(rank0["final"]).items():
        assert torch.equal(bias, rank1["final"][name]), f"{name}: ranks disagree"
        assert torch.equal(bias, single["final"][name]), f"{name}: 2 processes != 1 process"
        moved += not torch.equal(bias, initial[name])
    assert moved >= 2  # balancing ran in every MoE layer

    for name, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][name]), f"{name}: ranks disagree"
        torch.testing.assert_close(value, single["final"][name], rtol=0, atol=1e-4, msg=name)
        if name.endswith("e_score_correction_bias") or name.endswith("tokens_per_expert"):
            continue
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[3:5] == ["mlp", "experts"]:
            trained = SELECTION.get(int(parts[2]), [])
            for expert in range(value.shape[0]):
                same = torch.equal(value[expert], initial[name][expert])
                assert same != (expert in trained), f"{mode}: {name}[{expert}]"
        else:
            assert torch.equal(value, initial[name]), f"{mode}: frozen {name} changed"
