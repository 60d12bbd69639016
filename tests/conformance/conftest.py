"""Markers that transformers' generic tests (from its sdist, see upstream.py) put on their tests."""

from __future__ import annotations

import pytest

UPSTREAM_MARKERS = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                    "torch_compile_test")


def pytest_configure(config: pytest.Config) -> None:
    for marker in UPSTREAM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: a marker of transformers' own generic tests")
