"""Stand-ins (written here, not copied) for the three modules transformers' generic tests import from its GitHub
repository but that its source distribution does not ship: `tests/exporters/test_export.py`,
`tests/generation/test_utils.py` and `tests/utils/test_configuration_utils.py`.

- `ExportTesterMixin`: an empty base; export is checked elsewhere (issue #13's export part), not here.
- `GenerationTesterMixin`: an empty marker class. `ModelTesterMixin.test_generation_tester_mixin_inheritance`
  asks that a tester of a model that can generate inherits it; the generation modes themselves are covered by our
  own `tests/conformance/test_generation.py`.
- `config_common_kwargs`: PreTrainedConfig keyword arguments, each set to a value other than its default, which
  `ConfigTester.check_config_arguments_init` passes to the config class and then reads back.
"""

from __future__ import annotations

import sys
import types


class ExportTesterMixin:
    """Empty: the sdist lacks transformers' export tester (torch.export is tested by hf_moe's own export tests)."""


class GenerationTesterMixin:
    """Marker only: the sdist lacks transformers' generation tester; see tests/conformance/test_generation.py."""


#: PreTrainedConfig arguments with non-default values ("dtype" is compared with torch.float16 by ConfigTester).
config_common_kwargs: dict = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "tie_word_embeddings": True,
    "chunk_size_feed_forward": 3,
    "is_encoder_decoder": False,
    "architectures": ["ShimArchitecture"],
    "finetuning_task": "shim-task",
    "id2label": {0: "first", 1: "second"},
    "label2id": {"first": 0, "second": 1},
    "problem_type": "single_label_classification",
    "tokenizer_class": "ShimTokenizer",
    "bos_token_id": 5,
    "eos_token_id": 6,
    "pad_token_id": 7,
    "sep_token_id": 8,
}


def install(package: str) -> None:
    """Register the stand-ins as `<package>.exporters.test_export`, `<package>.generation.test_utils` and
    `<package>.utils.test_configuration_utils` in sys.modules (idempotent)."""
    modules = {
        "exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
        "generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
        "utils.test_configuration_utils": {"config_common_kwargs": config_common_kwargs},
    }
    for dotted, names in modules.items():
        parent_name = f"{package}.{dotted.split('.')[0]}"
        if parent_name not in sys.modules:
            parent = types.ModuleType(parent_name)
            parent.__path__ = []  # a namespace-like package: only what is registered here
            sys.modules[parent_name] = parent
        module = types.ModuleType(f"{package}.{dotted}", f"hf_moe's stand-in for transformers' tests/{dotted}.py")
        module.__dict__.update(names)
        sys.modules[module.__name__] = module
        setattr(sys.modules[parent_name], dotted.split(".")[1], module)
