"""DeepSpeed ZeRO-3 through the HF Trainer on CPU: 2 processes (torchrun, gloo). MoECallback marks every MoE block as
a ZeRO-3 leaf (gathered once per block, so the block's backward finds its parameters), the bias update runs on
every rank from the all-reduced loads, and the biases stay identical across ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")

WORKER = Path(__file__).with_name("zero3_worker.py")
ROOT = WORKER.parents[2]


@pytest.mark.slow
def test_zero3_trainer_two_processes_on_cpu(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["engine"] == "DeepSpeedEngine"
        assert report["leaves"] == 3  # 2 MoE layers + the MTP block
        assert len(report["losses"]) == 2 and all(math.isfinite(x) for x in report["losses"])
        assert {"moe/max_vio", "moe/lm_loss", "moe/aux_loss", "moe/mtp_loss"} <= set(report["moe_keys"])
    assert ranks[0]["biases"] == ranks[1]["biases"]
    assert any(b != 0 for layer in ranks[0]["biases"] for b in layer)
