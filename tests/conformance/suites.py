"""The conformance suites: transformers' ModelTesterMixin and ConfigTester (from its sdist, see `upstream.py`) on
a tiny config, as one unittest class per (config, model classes). The same factory builds hf_moe's suites
(`test_common.py`) and transformers' DeepseekV3 ones (`deepseek_v3_suite.py`, run by `compare.py`), so the counts
compare like with like."""

from __future__ import annotations

import functools
import unittest

import pytest

from . import shims, upstream
from .testers import TinyDecoderTester

common = upstream.load("test_modeling_common")
configuration_common = upstream.load("test_configuration_common")


def make_suite(name: str, config_class: type, config_kwargs: dict, model_classes: tuple[type, ...],
               divergences: dict[str, str] | None = None) -> type:
    """A unittest.TestCase running ModelTesterMixin on `model_classes` and ConfigTester on `config_class`.
    `divergences` (test name -> reason): tests expected to fail because the model departs from transformers on
    purpose; they run as strict xfails, so a test that starts passing is noticed."""
    generative = any(cls.can_generate() for cls in model_classes)
    bases = (common.ModelTesterMixin, *((shims.GenerationTesterMixin,) if generative else ()), unittest.TestCase)

    def setUp(self: unittest.TestCase) -> None:  # noqa: N802 (unittest's name)
        self.model_tester = TinyDecoderTester(self, common, config_class, config_kwargs)
        self.config_tester = configuration_common.ConfigTester(
            self, config_class=config_class, **{k: v for k, v in config_kwargs.items() if k != "num_labels"})

    def test_config(self: unittest.TestCase) -> None:
        self.config_tester.run_common_tests()

    namespace = {
        "__module__": __name__, "setUp": setUp, "test_config": test_config, "all_model_classes": model_classes,
        # routed experts that receive no token of a tiny batch get no gradient (as in transformers' MoE testers)
        "test_all_params_have_gradient": False,
        # the mixin dates a model by the copyright line of its config's file (none in hf_moe's: year 0) and skips
        # the _init_weights coverage test for models before 2023 unless this is set
        "test_can_init_all_missing_weights_before_2023": True,
    }
    for test, reason in (divergences or {}).items():
        namespace[test] = pytest.mark.xfail(strict=True, reason=reason)(_copy(getattr(common.ModelTesterMixin, test)))
    return type(name, bases, namespace)


def _copy(test: object) -> object:
    """A new function running `test` (a mark on it must not reach the mixin's shared function)."""

    @functools.wraps(test)
    def run(self: unittest.TestCase) -> None:
        test(self)

    return run
