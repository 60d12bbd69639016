"""hf_moe: DeepSeek-style Mixture-of-Experts models for Hugging Face Transformers.

`import hf_moe` registers model_type "hf_moe" with AutoConfig, AutoModel, AutoModelForCausalLM and
AutoModelForSequenceClassification.
"""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from . import (
    kernels,  # noqa: F401  registers the experts backends, "hf_moe_sdpa" attention and the seam kernels
    presets,  # noqa: F401  registers the published systems for MoEConfig.from_preset
    training,  # noqa: F401  so that hf_moe.training.MoECallback works after `import hf_moe`
)
from .conversion.convert import convert
from .conversion.upcycle import upcycle
from .conversion.upcycle_recipe import UpcycleRecipe
from .hub import push_to_hub, save_for_hub
from .modeling.cache import MoECache
from .modeling.configuration import MoEConfig
from .modeling.model import MoEForCausalLM, MoEForSequenceClassification, MoEModel, MoEPreTrainedModel

AutoConfig.register(MoEConfig.model_type, MoEConfig, exist_ok=True)
AutoModel.register(MoEConfig, MoEModel, exist_ok=True)
AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(MoEConfig, MoEForSequenceClassification, exist_ok=True)

__all__ = [
    "MoEConfig",
    "MoEPreTrainedModel",
    "MoEModel",
    "MoEForCausalLM",
    "MoEForSequenceClassification",
    "MoECache",
    "upcycle",
    "UpcycleRecipe",
    "convert",
    "save_for_hub",
    "push_to_hub",
    "__version__",
]
