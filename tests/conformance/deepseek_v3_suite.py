"""The conformance suites of `test_common.py` on transformers' own DeepseekV3 (same tiny shape as hf_moe's MLA
suite), for `compare.py`'s side-by-side counts. Not collected by CI (no `test_` prefix): `compare.py` runs it."""

from __future__ import annotations

from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV3ForSequenceClassification,
    DeepseekV3Model,
)

from .suites import make_suite
from .test_common import MLA

DEEPSEEK_V3 = {k: v for k, v in MLA.items() if k not in ("attention_type", "scoring_func")}
DEEPSEEK_V3["num_key_value_heads"] = DEEPSEEK_V3["num_attention_heads"]

DeepseekV3CausalLMTest = make_suite("DeepseekV3CausalLMTest", DeepseekV3Config, DEEPSEEK_V3,
                                    (DeepseekV3Model, DeepseekV3ForCausalLM))
DeepseekV3SequenceClassificationTest = make_suite("DeepseekV3SequenceClassificationTest", DeepseekV3Config,
                                                  DEEPSEEK_V3, (DeepseekV3ForSequenceClassification,))
