"""A folder written by plain `save_pretrained` loads with stock transformers and `trust_remote_code=True` in a process
that never imports hf_moe (what lm-eval, vLLM and most CLIs do), and where hf_moe is imported its own classes and
kernels are used even with `trust_remote_code=True`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe import MoEConfig, MoEForCausalLM
from tests.conftest import tiny_config

IDS = torch.arange(3, 20).view(1, -1)

WITHOUT_HF_MOE = r"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

out, threads, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.set_num_threads(int(threads))
reports = []
for i, folder in enumerate(folders):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.arange(3, 20).view(1, -1)).logits
    save_file({"logits": logits.contiguous()}, f"{out}/logits-{i}.safetensors")
    reports.append({"config": type(config).__module__ + "." + type(config).__name__,
                    "model": type(model).__module__ + "." + type(model).__name__,
                    "backends": [model.config._attn_implementation, model.config._experts_implementation]})
print(json.dumps({"folders": reports,
                  "hf_moe_modules": sorted(m for m in sys.modules if m == "hf_moe" or m.startswith("hf_moe."))}))
"""


def load_without_hf_moe(folders: list[Path], tmp_path: Path) -> list[tuple[dict, torch.Tensor]]:
    """Load each folder with stock transformers and `trust_remote_code=True` in ONE subprocess that never imports
    hf_moe (installed, editable, in this environment); checks the classes came from the folder's remote code and
    returns, per folder, what was loaded and its logits on IDS."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, "-c", WITHOUT_HF_MOE, str(tmp_path), str(torch.get_num_threads()),
                             *map(str, folders)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hf_moe_modules"] == []  # installed (editable) in this environment, never imported
    out = []
    for i, loaded in enumerate(report["folders"]):
        assert loaded["config"].startswith("transformers_modules.") and loaded["config"].endswith(".MoEConfig")
        assert loaded["model"].startswith("transformers_modules.") and loaded["model"].endswith(".MoEForCausalLM")
        out.append((loaded, load_file(tmp_path / f"logits-{i}.safetensors")["logits"]))
    return out


def hf_moe_logits(folder: Path, backends: list[str]) -> torch.Tensor:
    """The folder's logits on IDS as hf_moe itself loads it, with the backends the remote-code copy chose."""
    attn, experts = backends
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, experts_implementation=experts)
    assert type(model) is MoEForCausalLM
    with torch.no_grad():
        return model.eval()(IDS).logits


def saved(folder: Path, **options: object) -> Path:
    torch.manual_seed(0)
    MoEForCausalLM(tiny_config(num_nextn_predict_layers=1)).save_pretrained(folder, **options)
    return folder


def test_save_pretrained_writes_remote_code_that_loads_without_hf_moe(tmp_path: Path) -> None:
    folder = saved(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "model.MoEForCausalLM"
    assert (folder / "model.py").is_file() and (folder / "configuration.py").is_file()

    (report, logits), = load_without_hf_moe([folder], tmp_path)
    assert torch.equal(logits, hf_moe_logits(folder, report["backends"]))


def test_where_hf_moe_is_imported_its_classes_win_over_the_remote_code(tmp_path: Path) -> None:
    folder = saved(tmp_path / "model")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(config) is MoEConfig and type(model) is MoEForCausalLM
    assert model.config._experts_implementation == "hf_moe_auto"  # hf_moe's fast paths
    assert model.config._attn_implementation == "hf_moe_sdpa"


def test_remote_code_false_leaves_the_code_out(tmp_path: Path) -> None:
    folder = saved(tmp_path / "model", remote_code=False)
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    assert not list(folder.glob("*.py"))
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is MoEForCausalLM


def test_publishing_a_saved_folder_in_place_without_remote_code_removes_it(tmp_path: Path) -> None:
    from hf_moe import save_for_hub

    folder = saved(tmp_path / "model")
    save_for_hub(folder, folder, remote_code=False)
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    assert not list(folder.glob("*.py")) and (folder / "model.safetensors").is_file()
