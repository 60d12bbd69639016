"""The demo's two domains: code and the prose about it (docstrings, comments), from held-out stdlib files."""

from __future__ import annotations

import shutil

import pytest

from hf_moe.analysis.stdlib_domains import analyze_demo_run, split_source, write_stdlib_domains
from hf_moe.demo.corpus import stdlib_sources

SOURCE = '''"""Module docstring."""
import os  # an inline comment


def f(x):
    """Say what f does.

    More about it.
    """
    # a comment block
    # over two lines
    return x + 1  # another

text = "a string that is not a docstring"
'''


def test_split_source_separates_docstrings_and_comments_from_code() -> None:
    code, prose = split_source(SOURCE)
    assert code == 'import os\ndef f(x):\n    return x + 1\ntext = "a string that is not a docstring"\n'
    assert prose == ("Module docstring.\n\nSay what f does.\n\nMore about it.\n\nan inline comment\n\n"
                     "a comment block over two lines\n\nanother\n")
    assert "import" not in prose and "#" not in code and '"""' not in code
    with pytest.raises(ValueError, match="not valid Python"):
        split_source("def broken(:\n")


def test_domains_come_from_files_the_demo_did_not_train_on(tmp_path) -> None:
    code_path, prose_path = write_stdlib_domains(tmp_path, max_bytes=30_000, exclude_bytes=100_000)
    code, prose = code_path.read_text(), prose_path.read_text()
    assert len(code) > 5_000 and len(prose) > 1_000
    trained = stdlib_sources(max_bytes=100_000)
    first_trained = split_source(trained[0].read_text())[0].splitlines()[:3]
    assert "\n".join(first_trained) not in code


def test_analyze_demo_run_reads_final_and_its_checkpoints(model_folder, tmp_path) -> None:
    shutil.copytree(model_folder / "model", tmp_path / "final")
    shutil.copytree(model_folder / "model", tmp_path / "trainer" / "checkpoint-7")
    result = analyze_demo_run(tmp_path, max_tokens=64, max_bytes=20_000, progress=False)
    assert result.domains == ["code.txt", "prose.txt"] and result.tokens_per_domain == [64, 64]
    assert result.agreement is not None and result.agreement.steps == [7]
    assert result.agreement.agreement.eq(1.0).all()
    assert (tmp_path / "analysis" / "report.md").is_file() and (tmp_path / "analysis" / "domain_specialisation.png").is_file()
