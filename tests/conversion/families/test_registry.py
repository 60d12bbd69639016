"""The family registry: it finds every record by itself, names the known families when asked for another one,
and every record comes with its oracle cases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hf_moe.conversion import families
from hf_moe.conversion.families import DENSE_FAMILIES, MOE_FAMILIES, RECORDS, get_dense_family, get_family
from hf_moe.conversion.records import DenseFamily, MoEFamily
from tests.conversion.families.oracle import cases


def test_every_module_is_a_record_named_after_it() -> None:
    modules = sorted(p.stem for p in Path(families.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    assert sorted(RECORDS) == modules
    assert {"deepseek_v3", "deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"} <= set(MOE_FAMILIES)
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(DENSE_FAMILIES)
    assert all(isinstance(RECORDS[name], MoEFamily) for name in MOE_FAMILIES)
    assert all(isinstance(RECORDS[name], DenseFamily) for name in DENSE_FAMILIES)


def test_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="model_type='gpt_neo' is not a known MoE family") as error:
        get_family("gpt_neo")
    assert all(name in str(error.value) for name in MOE_FAMILIES)
    with pytest.raises(ValueError, match="model_type='gpt_neo' is not a known dense family") as error:
        get_dense_family("gpt_neo")
    assert all(name in str(error.value) for name in DENSE_FAMILIES)
    with pytest.raises(ValueError, match="dense family: make it MoE with hf_moe.upcycle"):
        get_family("llama")
    with pytest.raises(ValueError, match="For MoE checkpoints use hf_moe.convert"):
        get_dense_family("mixtral")


def test_a_module_without_a_proper_record_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fake_families"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_helpers.py").write_text("FAMILY = None  # skipped: a helper, not a record\n")
    (package / "llama.py").write_text("from hf_moe.conversion.families.llama import FAMILY\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert list(families.discover([str(package)], "fake_families")) == ["llama"]
    (package / "mistral.py").write_text("from hf_moe.conversion.families.llama import FAMILY  # wrong model_type\n")
    with pytest.raises(TypeError, match="fake_families.mistral must define FAMILY.*model_type='mistral'"):
        families.discover([str(package)], "fake_families")
    for name in [m for m in sys.modules if m.startswith("fake_families")]:
        monkeypatch.delitem(sys.modules, name)


def test_every_record_has_oracle_cases_of_its_own_family() -> None:
    for name in RECORDS:
        found = cases(type(RECORDS[name]))
        mine = [case for case in found.values() if case.family == name]
        assert mine, f"tests/conversion/families/test_{name}.py has no CASES of model_type {name!r}"
    assert all(case.family in RECORDS for case in cases().values())
