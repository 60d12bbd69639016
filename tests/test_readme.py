"""Every code block of README.md runs, in order, in one namespace, in a temporary folder.

Python blocks are executed; bash blocks that call `hf-moe` are run through the CLI's `main`. The one block
not run here is the pair of set-up commands at the top: `scripts/test.sh` is what CI itself runs, and the
demo runs in `test_demo_quick_run` below with `--quick`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hf_moe.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)


def readme_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text())


def test_readme_starts_with_the_two_setup_commands() -> None:
    language, first = readme_blocks()[0]
    assert language == "bash"
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    root = README.parent
    assert (root / "scripts" / "demo.sh").exists() and (root / "scripts" / "test.sh").exists()
    assert "scripts/test.sh" in (root / ".ci" / "run").read_text()


def test_every_readme_code_block_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    blocks = readme_blocks()[1:]
    assert sum(language == "python" for language, _ in blocks) >= 6
    for index, (language, code) in enumerate(blocks):
        if language == "python":
            exec(compile(code, f"README.md block {index}", "exec"), namespace)
            continue
        for line in code.strip().splitlines():
            command = shlex.split(line, comments=True)
            assert command[0] == "hf-moe", f"README bash block {index} runs something other than hf-moe: {line}"
            assert main(command[1:]) == 0, line


@pytest.mark.slow
def test_demo_quick_run(tmp_path) -> None:
    """`hf-moe demo --quick`: trains, reloads with identical logits, MTP greedy == plain greedy."""
    from hf_moe.demo import run_demo

    metrics = run_demo(tmp_path / "demo", max_steps=4, quick=True)
    assert metrics["reload_max_abs_diff"] <= 1e-5
    assert metrics["mtp_greedy_identical"] is True
    assert (tmp_path / "demo" / "final" / "config.json").exists()
