"""Two domains from Python's standard library for analysing the demo model: code and the prose about it.

`write_stdlib_domains(folder)` splits standard-library sources into `code.txt` (the source with docstrings
and comments removed) and `prose.txt` (the docstrings and comments, as text), from files the demo did NOT
train on (those after the demo corpus's first `exclude_bytes`, in `stdlib_sources` order), so the analysis
sees held-out text of both kinds.

    python -m hf_moe.analysis.stdlib_domains outputs/demo/domains

`analyze_demo_run(output_dir)` is the analysis `hf-moe demo --analyze` adds: code vs prose through the
demo's final model, with its Trainer checkpoints (if it saved any) for early routing learning.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import tokenize
from pathlib import Path

from ..demo.corpus import stdlib_sources
from .pipeline import analyze
from .report import RoutingAnalysis

DEMO_CORPUS_BYTES = 3_000_000  # what `hf-moe demo` trains on (run_pretraining's default corpus)


def _docstring_nodes(tree: ast.AST) -> list[ast.Expr]:
    nodes = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                nodes.append(first)
    return nodes


def split_source(source: str) -> tuple[str, str]:
    """(code, prose) of one Python source: prose = its docstrings (cleaned, as `inspect.cleandoc`) and its
    comments (without '#'), one block per paragraph; code = the source without them. ValueError if it does
    not parse."""
    try:
        tree = ast.parse(source)
        comments = [tok for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT]
    except (SyntaxError, tokenize.TokenError, IndentationError) as error:
        raise ValueError(f"not valid Python: {error}") from error
    lines = source.splitlines()
    drop: set[int] = set()  # 0-based lines that belong to docstrings
    prose: list[str] = []
    for node in sorted(_docstring_nodes(tree), key=lambda n: n.lineno):
        drop.update(range(node.lineno - 1, (node.end_lineno or node.lineno)))
        prose.append(ast.get_docstring(ast.Module(body=[node], type_ignores=[])) or "")
    block: list[str] = []  # consecutive whole-line comments make one paragraph; an inline comment is its own
    last_row = -2
    for tok in comments:
        row, col = tok.start[0] - 1, tok.start[1]
        text = tok.string.lstrip("#").strip()
        whole_line = not lines[row][:col].strip()
        if block and not (whole_line and row == last_row + 1):
            prose.append(" ".join(block))
            block = []
        if text:
            block.append(text)
        last_row = row if whole_line else -2
        lines[row] = lines[row][:col].rstrip()
    if block:
        prose.append(" ".join(block))
    code = [line for i, line in enumerate(lines) if i not in drop and line.strip()]
    return "\n".join(code) + "\n", "\n\n".join(p for p in prose if p.strip()) + "\n"


def write_stdlib_domains(
    folder: str | os.PathLike, max_bytes: int = 2_000_000, exclude_bytes: int = DEMO_CORPUS_BYTES
) -> tuple[Path, Path]:
    """Write `folder/code.txt` and `folder/prose.txt` from up to `max_bytes` of standard-library sources not
    among the first `exclude_bytes` (the demo's training corpus). Returns the two paths."""
    seen = {path.resolve() for path in stdlib_sources(max_bytes=exclude_bytes)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    code_path, prose_path = folder / "code.txt", folder / "prose.txt"
    total = 0
    with code_path.open("w", encoding="utf-8") as code_file, prose_path.open("w", encoding="utf-8") as prose_file:
        for path in stdlib_sources():
            if path.resolve() in seen or total >= max_bytes:
                continue
            try:
                code, prose = split_source(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            code_file.write(code)
            prose_file.write(prose)
            total += path.stat().st_size
    return code_path, prose_path


def analyze_demo_run(
    output_dir: str | os.PathLike = "outputs/demo", max_tokens: int = 20_000, max_bytes: int = 2_000_000,
    progress: bool = True,
) -> RoutingAnalysis:
    """Analyse a demo run folder: `final/` on code vs prose (`write_stdlib_domains` into `domains/`), with the
    checkpoints in `trainer/checkpoint-*` in step order, in batches of 16 sequences of 128 tokens (the demo's
    training batch); the report goes to `analysis/`."""
    output_dir = Path(output_dir)
    domains = write_stdlib_domains(output_dir / "domains", max_bytes=max_bytes)
    checkpoints = sorted((output_dir / "trainer").glob("checkpoint-*"))  # `analyze` orders them by step
    return analyze(output_dir / "final", domains, output_dir=output_dir / "analysis", checkpoints=checkpoints,
                   max_tokens=max_tokens, seq_len=128, batch_size=16, progress=progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write code.txt and prose.txt")
    parser.add_argument("--max-bytes", type=int, default=2_000_000, help="bytes of source to split")
    args = parser.parse_args(argv)
    for path in write_stdlib_domains(args.folder, max_bytes=args.max_bytes):
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
