"""What `import hf_moe` registers, and what the attention names mean: "sdpa" is torch's
scaled_dot_product_attention (transformers' registered sdpa) in training and eval, for MLA and GQA, with none of
hf_moe's attention kernels; None/"auto" resolve to "hf_moe_sdpa" (logged); a remote-code copy of the seam
shares hf_moe's kernels."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_moe
from hf_moe import MoEForCausalLM
from hf_moe.kernels import BACKENDS, SEAM_KERNELS
from hf_moe.kernels.cpu import attention as softmax_attention
from hf_moe.kernels.cpu import mla_attention as mla_module
from hf_moe.modeling import attention, kernel_hooks
from tests.conftest import tiny_config, tiny_gqa_config
from tests.kernels.helpers import spy_calls

CONFIGS = pytest.mark.parametrize("make_config", [tiny_config, tiny_gqa_config], ids=["mla", "gqa"])


def test_import_registers_every_kernel() -> None:
    assert set(kernel_hooks.registered_kernels()) >= set(SEAM_KERNELS)
    assert all(kernel_hooks.get_kernel(name) is fn for name, fn in SEAM_KERNELS.items())
    assert all(ALL_EXPERTS_FUNCTIONS[name] is fn for name, fn in BACKENDS.items())
    assert ALL_ATTENTION_FUNCTIONS["hf_moe_sdpa"] is softmax_attention.hf_moe_sdpa_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS["hf_moe_sdpa"] is sdpa_mask  # padding masks reach the kernels
    hf_moe.kernels.register_kernels()  # idempotent
    assert all(kernel_hooks.get_kernel(name) is fn for name, fn in SEAM_KERNELS.items())


@CONFIGS
def test_sdpa_means_torch_sdpa_in_training_and_eval(make_config: object, monkeypatch: pytest.MonkeyPatch) -> None:
    torch_sdpa = spy_calls(monkeypatch, torch.nn.functional, "scaled_dot_product_attention")
    ours: list[int] = []
    for owner in (softmax_attention.SoftmaxAttentionFunction, mla_module.MLAAttentionFunction):
        spy_calls(monkeypatch, owner, "apply", ours)
    model = MoEForCausalLM(make_config(attn_implementation="sdpa"))
    assert model.config._attn_implementation == "sdpa"
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 97, (2, 9))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    assert len(torch_sdpa) == layers and ours == []
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert len(torch_sdpa) == 2 * layers and ours == []


@CONFIGS
def test_the_default_is_hf_moe_sdpa_and_runs_our_kernels(make_config: object, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    ours: list[int] = []
    for owner in (softmax_attention.SoftmaxAttentionFunction, mla_module.MLAAttentionFunction):
        spy_calls(monkeypatch, owner, "apply", ours)
    monkeypatch.setattr(attention, "_logged_defaults", set())
    with caplog.at_level(logging.INFO, logger="hf_moe.modeling.attention"):
        model = MoEForCausalLM(make_config())
        MoEForCausalLM(make_config(attn_implementation="auto"))
    assert model.config._attn_implementation == "hf_moe_sdpa"
    assert caplog.text.count("hf_moe attention: attn_implementation=None -> 'hf_moe_sdpa'") == 1
    ids = torch.randint(3, 97, (2, 9))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    assert len(ours) == model.config.num_hidden_layers
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


def test_without_hf_moe_attention_the_default_is_transformers_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where hf_moe has not registered its attention (remote code without hf_moe), None means transformers'
    default."""
    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "valid_keys", lambda: ["sdpa", "flash_attention_2"])
    assert attention.default_attention(None) is None
    assert attention.default_attention("auto") is None
    assert attention.default_attention("eager") == "eager"


def test_a_remote_code_copy_of_the_seam_shares_hf_moe_kernels() -> None:
    spec = importlib.util.spec_from_file_location("transformers_modules.someone.kernel_hooks", kernel_hooks.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy is not kernel_hooks and copy.get_kernel("rms_norm") is SEAM_KERNELS["rms_norm"]
    saved = sys.modules.pop("hf_moe.modeling.kernel_hooks")  # as in a process without hf_moe
    try:
        assert copy.registered_kernels() == () and copy.run_kernel("rms_norm", None, None) is None
    finally:
        sys.modules["hf_moe.modeling.kernel_hooks"] = saved


# Loads an exported folder's remote-code classes in a process where hf_moe IS imported: they pick up hf_moe's
# registered attention and experts and, through the shared seam, its kernels.
INSTALLED_SCRIPT = r"""
import json, sys
import torch
import hf_moe
from hf_moe.kernels.cpu import rms_norm, swiglu
from transformers.dynamic_module_utils import get_class_from_dynamic_module

calls = {"rms_norm": 0, "swiglu": 0}
for name, module, function in (("rms_norm", rms_norm, "RMSNormFunction"), ("swiglu", swiglu, "SwiGLUFunction")):
    owner = getattr(module, function)
    original = owner.apply
    def counted(*args, _name=name, _original=original):
        calls[_name] += 1
        return _original(*args)
    owner.apply = counted
torch.set_num_threads(int(sys.argv[2]))
# the Auto classes would pick the installed hf_moe classes: take the folder's own remote-code class
remote_class = get_class_from_dynamic_module("model.MoEForCausalLM", sys.argv[1])
model = remote_class.from_pretrained(sys.argv[1]).train()
ids = torch.arange(3, 20).view(1, -1)
model(input_ids=ids, labels=ids).loss.backward()
print(json.dumps({"class": type(model).__module__, "calls": calls,
                  "attn": model.config._attn_implementation, "experts": model.config._experts_implementation}))
"""


def test_remote_code_next_to_an_installed_hf_moe_uses_its_kernels(tmp_path: Path) -> None:
    from hf_moe import hub

    folder = hub.export_remote_code(MoEForCausalLM(tiny_config()), tmp_path / "tiny-moe")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, "-c", INSTALLED_SCRIPT, str(folder), str(torch.get_num_threads())],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules.")
    assert (report["attn"], report["experts"]) == ("hf_moe_sdpa", "hf_moe_auto")
    assert report["calls"]["rms_norm"] > 0 and report["calls"]["swiglu"] > 0
