"""`hf-moe demo`, the README's main job, offline on a laptop CPU: `corpus` (Python's standard-library sources,
a BPE tokenizer, packed blocks), `recipe` (a small DeepSeek-V3-style MoE with MTP, pretrained with the HF
Trainer: `run_pretraining`), `run` (pretrain, save, reload, generate: `run_demo`)."""

from .run import run_demo

__all__ = ["run_demo"]
