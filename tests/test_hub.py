"""Publishing: remote-code export (loaded in a process where hf_moe cannot be imported), model card, Hub-ready
folders, the upload call (network mocked), and safe loading (safetensors only, strict about weight names)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

import hf_moe.hub as hub
from hf_moe import MoEForCausalLM, MoEModel
from hf_moe.inspection import count_parameters, human_count
from hf_moe.modeling import model as modeling_model
from tests.conftest import tiny_config, tiny_gqa_config

MODELING_DIR = Path(modeling_model.__file__).parent
IDS = torch.arange(3, 20).view(1, -1)  # (1, 17)


def random_model(**overrides: object) -> MoEForCausalLM:
    """A tiny model with non-trivial values everywhere, including the balancing bias."""
    model = MoEForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.copy_(torch.randn_like(tensor) * 0.2 + (tensor.dim() == 1))
        for name, tensor in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model


def front_matter(card: str) -> tuple[dict, str]:
    """(YAML metadata, markdown body) of a model card."""
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


# ----------------------------------------------------------------------------------------------- remote code
def test_every_modeling_file_imports_only_what_remote_code_allows() -> None:
    files = sorted(p for p in MODELING_DIR.glob("*.py") if p.name != "__init__.py")
    hub.check_remote_code_imports(files)  # raises naming the file otherwise
    exported = {f.name for f in hub.remote_code_files()}
    assert {"model.py", "configuration.py", "routing.py", "experts.py", "attention.py"} <= exported


def test_a_foreign_import_is_refused_with_file_and_package_named(tmp_path: Path) -> None:
    bad = tmp_path / "helper.py"
    bad.write_text("import torch\n\ndef f():\n    import numpy\n    from hf_moe.inspection import count_parameters\n")
    with pytest.raises(ImportError, match=r"helper\.py imports \['hf_moe', 'numpy'\]"):
        hub.check_remote_code_imports([bad])


def test_export_from_a_saved_folder_copies_it_and_adds_auto_map(tmp_path: Path) -> None:
    model = random_model()
    model.save_pretrained(tmp_path / "saved", remote_code=False)
    out = hub.export_remote_code(tmp_path / "saved", tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == hub.AUTO_MAP
    assert (out / "model.safetensors").is_file()
    assert not (tmp_path / "saved" / "model.py").exists(), "the source folder must stay untouched"
    for reference in config["auto_map"].values():  # every "file.Class" names a copied file defining it
        module, name = reference.split(".")
        assert f"class {name}(" in (out / f"{module}.py").read_text()
    for file in hub.remote_code_files():
        assert (out / file.name).read_bytes() == file.read_bytes()


def test_export_refuses_a_folder_of_another_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        hub.export_remote_code(tmp_path, tmp_path)


# Runs where hf_moe cannot be imported: a meta-path finder refuses it (the editable install would find it).
# Loads the exported folder from a local path and, as a Hub download would, by repo id from an offline cache.
REMOTE_SCRIPT = r"""
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_moe" or name.startswith("hf_moe."):
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)")
sys.meta_path.insert(0, Refuse())
try:
    import hf_moe
    sys.exit("hf_moe is importable")
except ImportError:
    pass
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

folder, repo_id, tampered, out, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))  # the same reduction order as the parent process
ids = torch.arange(3, 20).view(1, -1)
report = {}
for name, source in (("local", folder), ("hub", repo_id)):
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    save_file({"logits": logits.contiguous(), "generated": generated}, f"{out}/{name}.safetensors")
    report[name] = type(model).__module__ + "." + type(model).__name__
    report["backends"] = {"attn_implementation": model.config._attn_implementation,
                          "experts_implementation": model.config._experts_implementation}
for auto in (AutoModel, AutoModelForSequenceClassification):
    report[auto.__name__] = type(auto.from_pretrained(folder, trust_remote_code=True)).__name__
try:
    AutoModelForCausalLM.from_pretrained(tampered, trust_remote_code=True)
    report["tampered"] = "loaded"
except RuntimeError as error:
    report["tampered"] = str(error)
report["hf_moe_modules"] = sorted(m for m in sys.modules if m == "hf_moe" or m.startswith("hf_moe."))
print(json.dumps(report))
"""


def fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded snapshot of model repo `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_exported_model_loads_with_trust_remote_code_without_hf_moe_and_matches(tmp_path: Path) -> None:
    folder = hub.export_remote_code(random_model(num_nextn_predict_layers=1), tmp_path / "tiny-moe")
    fake_hub_cache(tmp_path / "hub", "someone/tiny-moe", folder)
    tampered = hub.export_remote_code(folder, tmp_path / "tampered")
    weights = load_file(tampered / "model.safetensors")
    weights["model.layers.1.mlp.extra"] = torch.zeros(2)
    save_file(weights, tampered / "model.safetensors", metadata={"format": "pt"})

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_MODULES_CACHE=str(tmp_path / "modules"),
               TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), "someone/tiny-moe", str(tampered), str(tmp_path),
         str(torch.get_num_threads())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hf_moe_modules"] == []
    # the reference: hf_moe's own classes on the same backends (installed hf_moe would default to its kernels)
    installed = AutoModelForCausalLM.from_pretrained(folder, **report["backends"])
    assert type(installed) is MoEForCausalLM
    assert installed.config._experts_implementation == report["backends"]["experts_implementation"]
    with torch.no_grad():
        expected_logits = installed(IDS).logits
        expected_generated = installed.generate(IDS, max_new_tokens=4, do_sample=False)
    for name in ("local", "hub"):
        assert report[name].startswith("transformers_modules.") and report[name].endswith(".model.MoEForCausalLM")
        got = load_file(tmp_path / f"{name}.safetensors")
        assert torch.equal(got["logits"], expected_logits), name
        assert torch.equal(got["generated"], expected_generated), name
    assert report["AutoModel"] == "MoEModel"
    assert report["AutoModelForSequenceClassification"] == "MoEForSequenceClassification"
    assert "Unexpected weights: model.layers.1.mlp.extra" in report["tampered"]


# ------------------------------------------------------------------------------------------------ model card
def test_model_card_metadata_and_architecture_table() -> None:
    config = tiny_config(num_nextn_predict_layers=1, seq_aux_loss_alpha=1e-4)
    config.upcycled_from = {"base_model": "org/dense-1b", "num_experts": 8, "top_k": 2, "strategy": "copy"}
    card = hub.model_card(config, repo_id="me/tiny-moe", license="apache-2.0", tags=["demo"],
                          balance={"MaxVio (per layer)": [0.5, 0.25], "measured on": "toy data, 4k tokens"})
    meta, body = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["hf_moe", "moe", "mixture-of-experts", "custom_code", "upcycled", "demo"]
    assert meta["base_model"] == "org/dense-1b"
    assert meta["upcycling"] == config.upcycled_from

    count = count_parameters(config)
    assert f"| Parameters (total) | {human_count(count.total)} ({count.total:,}) |" in body
    assert f"| Parameters (active per token) | {human_count(count.active)} ({count.active:,}) |" in body
    assert "| Layers | 3 (1 dense, 2 MoE) |" in body
    assert "| Routed experts | 8 per MoE layer, 2 active per token, width 16 |" in body
    assert ("| Routing | 8 routed experts of 16, top-2, sigmoid, noaux_tc, 4 groups (keep 2), renormalised, "
            "scaling 1.5; 1 shared (16 wide) |") in body
    assert "auxiliary-loss-free bias (gamma 0.001), sequence-wise balance loss (0.0001)" in body
    assert f"| Multi-token prediction | 1 module(s), {human_count(count.mtp)} parameters (not in the total) |" in body
    assert "| MaxVio (per layer) | 0.25 / 0.375 / 0.5 (min / mean / max over 2) |" in body
    assert "| strategy | copy |" in body
    assert 'from_pretrained("me/tiny-moe", trust_remote_code=True)' in body


def test_model_card_without_recipe_license_or_remote_code(tmp_path: Path) -> None:
    config = tiny_gqa_config()
    config.upcycled_from = {"source": str(tmp_path), "num_experts": 8}  # a local path is no Hub base_model
    meta, body = front_matter(hub.model_card(config, remote_code=False))
    assert "license" not in meta and "base_model" not in meta
    assert "custom_code" not in meta["tags"]
    assert f"dense model `{tmp_path}`" in body
    assert "| Multi-token prediction | none |" in body and "Expert load balance" not in body
    assert "import hf_moe" in body and "trust_remote_code" not in body


# ------------------------------------------------------------------------------------------ folders, upload
def test_save_for_hub_writes_a_complete_sharded_folder_that_reloads(tmp_path: Path) -> None:
    model = random_model()
    out = hub.save_for_hub(model, tmp_path / "repo", license="mit", max_shard_size="20KB")
    names = {p.name for p in out.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    assert {"config.json", "generation_config.json", "README.md", "model.py", "configuration.py"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert json.loads((out / "config.json").read_text())["auto_map"] == hub.AUTO_MAP
    assert front_matter((out / "README.md").read_text())[0]["license"] == "mit"

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is MoEForCausalLM  # hf_moe installed: its own classes, not the copied code
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name

    plain = hub.save_for_hub(reloaded, tmp_path / "plain", remote_code=False)  # config came with an auto_map
    assert "auto_map" not in json.loads((plain / "config.json").read_text())
    assert not (plain / "model.py").exists()


def test_save_for_hub_from_a_saved_folder_leaves_pickles_out(tmp_path: Path) -> None:
    config = tiny_gqa_config()
    config.upcycled_from = {"base_model": "org/dense", "num_experts": 8}
    model = MoEForCausalLM(config)
    model.save_pretrained(tmp_path / "trained")
    torch.save({"step": 3}, tmp_path / "trained" / "optimizer.pt")
    torch.save(model.state_dict(), tmp_path / "trained" / "pytorch_model.bin")
    (tmp_path / "trained" / "tokenizer.json").write_text("{}")

    out = hub.save_for_hub(tmp_path / "trained", tmp_path / "repo", license="mit")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "README.md", "model.py"} <= names
    assert not {"optimizer.pt", "pytorch_model.bin"} & names
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "trained" / "model.safetensors").read_bytes()
    meta, body = front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "org/dense" and meta["upcycling"] == {"base_model": "org/dense", "num_experts": 8}
    assert f"({count_parameters(config).total:,})" in body

    with pytest.raises(FileExistsError, match="overwrite=True"):
        hub.save_for_hub(tmp_path / "trained", out)
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    hub.save_for_hub(tmp_path / "trained", out, overwrite=True, remote_code=False)
    assert not (out / "model-00001-of-00009.safetensors").exists() and not (out / "model.py").exists()

    with pytest.raises(ValueError, match="contains the source folder"):
        hub.save_for_hub(tmp_path / "trained", tmp_path, overwrite=True)
    hub.save_for_hub(tmp_path / "trained", tmp_path / "trained")  # in place: adds the card and the code
    assert (tmp_path / "trained" / "README.md").is_file() and (tmp_path / "trained" / "model.py").is_file()

    (tmp_path / "pickled").mkdir()
    shutil.copy(tmp_path / "trained" / "config.json", tmp_path / "pickled")
    shutil.copy(tmp_path / "trained" / "pytorch_model.bin", tmp_path / "pickled")
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        hub.save_for_hub(tmp_path / "pickled", tmp_path / "repo2")


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records calls and what the uploaded folder held."""

    calls: list[tuple[str, dict]] = []
    uploaded: dict[str, bytes] = {}

    def __init__(self, token: object = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kwargs: object) -> object:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path: Path, **kwargs: object) -> str:
        self.calls.append(("upload_folder", kwargs))
        FakeApi.uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "commit-info"


def test_push_to_hub_uploads_the_hub_folder_in_one_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "calls", [])
    model = random_model()
    result = hub.push_to_hub(model, "me/tiny-moe", token="tok", private=True, revision="v1", license="apache-2.0")
    assert result == "commit-info"
    kinds = [name for name, _ in FakeApi.calls]
    assert kinds == ["init", "create_repo", "create_branch", "upload_folder"]
    assert FakeApi.calls[0][1] == {"token": "tok"}
    assert FakeApi.calls[1][1] == {"repo_id": "me/tiny-moe", "private": True, "exist_ok": True, "repo_type": "model"}
    upload = FakeApi.calls[3][1]
    assert upload["repo_id"] == "me/tiny-moe" and upload["revision"] == "v1" and upload["create_pr"] is False
    assert {"*.safetensors", "model.safetensors.index.json", "model.py"} <= set(upload["delete_patterns"])

    files = FakeApi.uploaded
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "model.py"} <= set(files)
    assert json.loads(files["config.json"])["auto_map"] == hub.AUTO_MAP
    meta, body = front_matter(files["README.md"].decode())
    assert meta["license"] == "apache-2.0" and body.lstrip().startswith("# tiny-moe\n")
    uploaded = load_safetensors_bytes(files["model.safetensors"])
    assert uploaded.keys() == model.state_dict().keys()
    assert all(torch.equal(uploaded[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ safe loading
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    random_model().save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def tamper(folder: Path, add: str | None = None, drop: str | None = None) -> None:
    weights = load_file(folder / "model.safetensors")
    if add:
        weights[add] = torch.zeros(3)
    if drop:
        del weights[drop]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_unexpected_and_missing_weights_fail_naming_them(saved: Path) -> None:
    tamper(saved, add="model.layers.0.mlp.stray", drop="model.layers.2.mlp.gate.e_score_correction_bias")
    with pytest.raises(RuntimeError) as error:
        AutoModelForCausalLM.from_pretrained(saved)
    message = str(error.value)
    assert "Missing weights: model.layers.2.mlp.gate.e_score_correction_bias." in message
    assert "Unexpected weights: model.layers.0.mlp.stray." in message


def test_a_missing_weight_alone_fails_and_strict_false_loads(saved: Path) -> None:
    tamper(saved, drop="model.norm.weight")
    with pytest.raises(RuntimeError, match=r"Missing weights: model\.norm\.weight\. Unexpected weights: none"):
        MoEForCausalLM.from_pretrained(saved)
    model, info = AutoModelForCausalLM.from_pretrained(saved, strict=False, output_loading_info=True)
    assert type(model) is MoEForCausalLM and info["missing_keys"] == {"model.norm.weight"}


def test_loading_into_another_head_keeps_transformers_behaviour(saved: Path) -> None:
    model = AutoModel.from_pretrained(saved)  # a causal-LM checkpoint into the bare model: lm_head is left out
    assert type(model) is MoEModel
    with pytest.raises(RuntimeError, match=r"Unexpected weights: lm_head\.weight"):
        MoEModel.from_pretrained(saved, strict=True)


def test_pickle_checkpoints_are_refused(saved: Path) -> None:
    weights = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    torch.save(weights, saved / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(saved)
    with pytest.raises(ValueError, match="safetensors checkpoints only"):
        AutoModelForCausalLM.from_pretrained(saved, use_safetensors=False)


def test_model_save_pretrained_writes_a_card_and_push_to_hub_goes_through_hf_moe(tmp_path, monkeypatch) -> None:
    import hf_moe.hub
    from hf_moe import MoEForCausalLM
    from tests.conftest import tiny_config

    model = MoEForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "hf_moe" in card and "mixture-of-experts" in card
    calls = []
    monkeypatch.setattr(hf_moe.hub, "push_to_hub", lambda model, repo_id, **kw: calls.append((model, repo_id, kw)))
    model.push_to_hub("someone/tiny-moe", license="mit")
    assert calls == [(model, "someone/tiny-moe", {"license": "mit"})]


# ------------------------------------------------------------------------------------- safe publishing
def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root`, hidden ones included (relative name -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_publish_copies_weights_config_and_tokenizer_only(tmp_path: Path) -> None:
    """Planted secrets, pickles (any case), code, data files, folders and symlinks out stay behind."""
    model = random_model()
    src = tmp_path / "trained"
    model.save_pretrained(src, max_shard_size="40KB")
    (tmp_path / "id_rsa").write_text("PRIVATE KEY")
    (src / "tokenizer_config.json").write_text("{}")
    (src / ".env").write_text("HF_TOKEN=hf_secret")
    (src / "id_rsa").symlink_to(tmp_path / "id_rsa")
    (src / "vocab.json").symlink_to(tmp_path / "id_rsa")  # an allowed name, but a link out of the folder
    for name in ("model.PKL", "optimizer.PT", "weights.Pth", "state.joblib", "arr.npy", "extra.bin", "notes.txt",
                 "foo.py", "model.py", "stray.safetensors"):  # fmt: skip
        (src / name).write_bytes(b"\x80\x04 not for publishing")
    (src / "checkpoint-10").mkdir()
    (src / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")

    out = hub.save_for_hub(src, tmp_path / "repo")
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    code = sorted(f.name for f in hub.remote_code_files())
    expected = sorted([*shards, "model.safetensors.index.json", "config.json", "generation_config.json",
                       "tokenizer_config.json", "README.md", *code])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == expected
    assert (out / "model.py").read_bytes() == (MODELING_DIR / "model.py").read_bytes()  # ours, not the source's
    assert all(b"PRIVATE KEY" not in data and b"hf_secret" not in data for data in tree(out).values())
    assert all((out / s).read_bytes() == (src / s).read_bytes() for s in shards)

    (src / "model.safetensors.index.json").write_text(json.dumps(  # an index sending a shard out of the folder
        {"weight_map": {"model.embed_tokens.weight": "../id_rsa"}}))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json entry 'model.embed_tokens.weight'"):
        hub.save_for_hub(src, tmp_path / "repo2")
    assert not (tmp_path / "repo2").exists()

    index = json.loads((src / "model.safetensors.index.json").read_text())
    for planted in (".env", "optimizer.PT", "notes.txt"):  # inside the folder, but no visible safetensors shard
        weight_map = {**dict.fromkeys(["model.norm.weight"], "stray.safetensors"), "extra.secret": planted}
        (src / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(ValueError, match=rf"entry 'extra.secret' names '{planted}'"):
            hub.save_for_hub(src, tmp_path / "repo3")
        assert not (tmp_path / "repo3").exists()


def test_publish_overwrite_keeps_the_old_folder_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:  # fmt: skip
    import errno

    model = random_model()
    model.save_pretrained(tmp_path / "trained", max_shard_size="40KB")
    out = hub.save_for_hub(tmp_path / "trained", tmp_path / "repo")
    before = tree(tmp_path)
    real_copy, calls = shutil.copyfile, []

    def disk_full(source: object, target: object, **kwargs: object) -> object:
        calls.append(target)
        if len(calls) == 3:
            Path(target).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_copy(source, target, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        hub.save_for_hub(tmp_path / "trained", out, overwrite=True)
    monkeypatch.setattr(shutil, "copyfile", real_copy)

    def dies_after_the_weights(folder: object, **kwargs: object) -> None:
        MoEForCausalLM.save_pretrained(model, folder, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", dies_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        hub.save_for_hub(model, out, overwrite=True)
    assert tree(tmp_path) == before  # the earlier folder whole, nothing half-written or hidden beside it


def test_a_bad_card_field_fails_before_anything_is_written(tmp_path: Path) -> None:
    model = random_model()
    with pytest.raises(ValueError, match=r"upcycled_from='x'"):
        model.config.upcycled_from = "x"  # refused here or when the card is built, never after the weights
        hub.save_for_hub(model, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"upcycled_from='x'"):
        model.config.upcycled_from = "x"
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()  # no weights, no 0-byte README


def test_publish_refuses_an_output_inside_the_source(tmp_path: Path) -> None:
    random_model().save_pretrained(tmp_path / "trained")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="is inside the source folder"):
        hub.save_for_hub(tmp_path / "trained", tmp_path / "trained" / "hub")
    assert tree(tmp_path) == before
