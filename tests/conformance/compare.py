"""Side-by-side counts of the conformance suites: hf_moe's (test_common.py) and transformers' DeepseekV3
(deepseek_v3_suite.py), the same tests on the same tiny shape.

    python -m tests.conformance.compare [extra pytest arguments]

Prints passed / failed / skipped / xfailed (hf_moe's documented divergences) per suite class, then every failure,
skip reason and divergence per class. Subtests (unittest's subTest) are counted apart."""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


class Counter:
    """pytest plugin: the outcome of each test's call phase (or its setup, when that skipped or failed)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.details: dict[str, list[str]] = collections.defaultdict(list)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and report.outcome == "passed":
            return
        suite, _, test = report.nodeid.split("::", 1)[1].partition("::")
        if hasattr(report, "context"):  # a subtest (pytest's SubtestReport): counted apart
            self.outcomes[suite][f"subtests {report.outcome}"] += 1
            if report.outcome == "failed":
                self.details[suite].append(f"  FAILED  {test} (a subtest)")
            elif report.outcome == "skipped":
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                self.details[suite].append(f"  skipped {test} (a subtest): {reason}")
            return
        if hasattr(report, "wasxfail"):
            self.outcomes[suite]["xfailed"] += 1
            self.details[suite].append(f"  xfail   {test}: {report.wasxfail}")
            return
        self.outcomes[suite][report.outcome] += 1
        if report.outcome == "skipped":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.details[suite].append(f"  skipped {test}: {reason}")
        elif report.outcome == "failed":
            self.details[suite].append(f"  FAILED  {test}: {report.longrepr.reprcrash.message.splitlines()[0][:160]}"
                                       if hasattr(report.longrepr, "reprcrash") else f"  FAILED  {test}")


def main(argv: list[str]) -> int:
    counter = Counter()
    start = time.perf_counter()
    pytest.main([str(HERE / "test_common.py"), str(HERE / "deepseek_v3_suite.py"), "-q", "-p", "no:cacheprovider",
                 *argv], plugins=[counter])
    print(f"\nconformance suites ({time.perf_counter() - start:.0f} s)")
    print(f"{'suite':40} {'passed':>7} {'failed':>7} {'skipped':>8} {'xfailed':>8}   subtests passed/failed/skipped")
    for suite, counts in counter.outcomes.items():
        print(f"{suite:40} {counts['passed']:7} {counts['failed']:7} {counts['skipped']:8} {counts['xfailed']:8}   "
              f"{counts['subtests passed']}/{counts['subtests failed']}/{counts['subtests skipped']}")
    for suite, lines in counter.details.items():
        print(f"\n{suite}:")
        print("\n".join(sorted(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
