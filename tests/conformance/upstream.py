"""transformers' own generic model tests, imported at test time from the source distribution of the installed
transformers (`scripts/setup.sh` unpacks it into `.cache/transformers-tests/<version>/`; nothing of it is in this
repository).

The sdist's `tests/` folder is imported as the package `transformers_sdist_tests` (our own `tests` package has
that name taken), with `shims.py` standing in for the three modules the sdist lacks. Its tests find base models and
heads through transformers' built-in class-name tables (`MODEL_MAPPING_NAMES`, `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`,
...), which `AutoModel.register` never fills: `register_model_names` adds a model type's classes to the loaded
test module's own copies of those tables (transformers' tables are left untouched).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import transformers

from . import shims

PACKAGE = "transformers_sdist_tests"
ENV_VAR = "HF_MOE_TRANSFORMERS_TESTS"
REPO = Path(__file__).resolve().parents[2]
SETUP_COMMAND = "bash scripts/setup.sh"


def tests_folder() -> Path:
    """The sdist's tests/ folder: $HF_MOE_TRANSFORMERS_TESTS, else .cache/transformers-tests/<version>/tests."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    return REPO / ".cache" / "transformers-tests" / transformers.__version__ / "tests"


def _missing_reason(folder: Path) -> str:
    return (f"transformers' generic tests for transformers=={transformers.__version__} are not at {folder}: run "
            f"`{SETUP_COMMAND}` (it downloads the sdist with `pip download --no-binary :all: --no-deps "
            f"transformers=={transformers.__version__}` and unpacks its tests/ there), or set {ENV_VAR} to an "
            "unpacked sdist's tests/ folder.")


def load(module: str) -> types.ModuleType:
    """Import `<sdist tests>/<module>.py` (e.g. "test_modeling_common"); skip the calling test module, naming the
    command that fetches the sdist, when it is absent."""
    folder = tests_folder()
    if not (folder / "test_modeling_common.py").is_file():
        pytest.skip(_missing_reason(folder), allow_module_level=True)
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE, "transformers' tests/ folder from its source distribution")
        package.__path__ = [str(folder)]
        sys.modules[PACKAGE] = package
        shims.install(PACKAGE)
    # test_configuration_common calls direct_transformers_import(<its folder>), which executes that folder's
    # __init__.py (the sdist has none) only to return the transformers module already imported
    original = transformers.utils.direct_transformers_import
    transformers.utils.direct_transformers_import = lambda *args, **kwargs: transformers
    try:
        return importlib.import_module(f"{PACKAGE}.{module}")
    finally:
        transformers.utils.direct_transformers_import = original


#: test_modeling_common's class-name tables, by what a class is for.
TABLES = {
    "base": "MODEL_MAPPING_NAMES",
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "sequence_classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
}


def register_model_names(common: types.ModuleType, model_type: str, **classes: type) -> None:
    """Make the loaded test module find `model_type`'s classes, e.g. `base=MoEModel, causal_lm=MoEForCausalLM`,
    as it finds a built-in model's: each of its tables becomes a copy with the entry added."""
    for role, cls in classes.items():
        table_name = TABLES[role]
        table = type(getattr(common, table_name))(getattr(common, table_name))  # OrderedDict copy
        table[model_type] = cls.__name__
        setattr(common, table_name, table)
