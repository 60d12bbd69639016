"""Pretrain a small DeepSeek-V3-style MoE with multi-token prediction from scratch, on a CPU, in minutes.

The recipe of DeepSeek-V3 at toy scale: MLA attention, sigmoid router with group-limited top-k and
auxiliary-loss-free bias balancing (gamma = 1e-3), a tiny sequence-wise balance loss (alpha = 1e-4), one shared
expert, a first dense layer, and one MTP module (lambda = 0.3). Data: Python's own standard-library sources
(`hf_moe.demo.corpus`), a byte-level BPE tokenizer trained on them. Training: `transformers.Trainer` with
`MoECallback`. Afterwards: eval loss, the eval set's expert load and MaxVio, and the MTP modules' draft
acceptance in self-speculative greedy decoding (`MoEForCausalLM.generate_with_mtp`).

`examples/pretrain_mtp.py` is the command line; `run_pretraining` is what `hf-moe demo` calls.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from ..modeling.configuration import MoEConfig
from ..modeling.model import MoEForCausalLM
from ..training.balancing import ExpertLoads
from ..training.callbacks import MoECallback
from ..training.metrics import expert_load
from .corpus import build_lm_datasets, stdlib_sources, train_tokenizer


def demo_config(vocab_size: int, gamma: float = 1e-3, **overrides: Any) -> MoEConfig:
    """A ~2.8M-parameter DeepSeek-V3-shaped model (4 layers, the first dense; 16 routed experts, top-4 within
    the 2 best of 4 groups, 1 shared; MLA; 1 MTP module) for a 2048-token vocabulary."""
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        attention_type="mla", q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, max_position_embeddings=1024,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, n_shared_experts=1,
        first_k_dense_replace=1, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5,
        router_bias_update_rate=gamma, seq_aux_loss_alpha=1e-4, num_nextn_predict_layers=1, mtp_loss_weight=0.3,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    fields.update(overrides)
    return MoEConfig(**fields)


@dataclass
class PretrainResult:
    """What `run_pretraining` produced: the trained model and tokenizer, the Trainer's log history (with the
    `moe/` keys), the callback (per-step MaxVio in `.history`), the eval set's expert loads, summary metrics."""

    model: MoEForCausalLM
    tokenizer: Any
    log_history: list[dict[str, Any]]
    callback: MoECallback
    eval_loads: ExpertLoads
    metrics: dict[str, float] = field(default_factory=dict)
    output_dir: Path | None = None


class _PrintLogs(TrainerCallback):
    """One line per training log: step, loss and its parts, MaxVio."""

    def __init__(self, print_fn: Callable[[str], None]) -> None:
        self.print_fn = print_fn

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if not logs or "loss" not in logs:
            return
        parts = [f"step {state.global_step:>5}", f"loss {logs['loss']:.3f}"]
        for key, name in (("moe/lm_loss", "lm"), ("moe/mtp_loss", "mtp"), ("moe/aux_loss", "aux")):
            if key in logs:
                parts.append(f"{name} {logs[key]:.4f}" if name == "aux" else f"{name} {logs[key]:.3f}")
        if "moe/max_vio" in logs:
            parts.append(f"MaxVio {logs['moe/max_vio']:.3f}")
        self.print_fn(" | ".join(parts))


def mtp_acceptance(
    model: MoEForCausalLM, prompts: list[torch.Tensor], max_new_tokens: int = 32
) -> dict[str, float]:
    """Self-speculative greedy decoding over `prompts` (1-D token tensors): draft acceptance rate and tokens per
    main-model forward, summed over the prompts."""
    model.eval()
    drafted = accepted = forwards = generated = 0
    for prompt in prompts:
        out = model.generate_with_mtp(prompt.unsqueeze(0), max_new_tokens=max_new_tokens, eos_token_id=[])
        drafted, accepted = drafted + out.drafted, accepted + out.accepted
        forwards, generated = forwards + out.main_forwards, generated + out.new_tokens - 1
    return {"mtp_acceptance": accepted / drafted if drafted else float("nan"),
            "mtp_tokens_per_forward": generated / forwards if forwards else float("nan")}


def run_pretraining(
    output_dir: str | Path,
    max_steps: int = 300,
    quick: bool = False,
    corpus_bytes: int | None = None,
    vocab_size: int = 2048,
    block_size: int = 128,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    gamma: float = 1e-3,
    seed: int = 0,
    logging_steps: int | None = None,
    eval_batches: int | None = None,
    acceptance_prompts: int = 8,
    plots: bool = False,
    save_steps: int | None = None,
    print_fn: Callable[[str], None] | None = print,
    config_overrides: dict[str, Any] | None = None,
) -> PretrainResult:
    """Train the `demo_config` model from scratch on the standard library's sources and report.

    quick: a smoke run (smaller corpus and eval, at most 30 steps). Writes `output_dir/final` (model +
    tokenizer, loadable with AutoModelForCausalLM / AutoTokenizer), `output_dir/metrics.json` and, with
    `plots=True` (needs matplotlib: the `plot` extra), `expert_load.png` and `max_vio.png`; with `save_steps`,
    the model every that many steps in `output_dir/trainer/checkpoint-{step}` (weights only; for
    `hf-moe analyze --checkpoints`).
    """
    say = print_fn or (lambda _msg: None)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        max_steps = min(max_steps, 30)
    corpus_bytes = corpus_bytes or (400_000 if quick else 3_000_000)
    eval_batches = eval_batches if eval_batches is not None else (2 if quick else 8)
    logging_steps = logging_steps or max(1, min(25, max_steps // 10))
    torch.manual_seed(seed)

    started = time.perf_counter()
    files = stdlib_sources(max_bytes=corpus_bytes)
    tokenizer = train_tokenizer(files, vocab_size=vocab_size)
    datasets = _quietly(build_lm_datasets, files, tokenizer, block_size=block_size, seed=seed,
                        cache_dir=output_dir / "datasets-cache")
    train_set, eval_set = datasets["train"], datasets["eval"]
    eval_set = eval_set.select(range(min(len(eval_set), eval_batches * batch_size)))
    say(f"corpus: {len(files)} standard-library files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB -> "
        f"{len(train_set)} train / {len(eval_set)} eval blocks of {block_size} tokens "
        f"(tokenizer: byte-level BPE, {len(tokenizer)} tokens) in {time.perf_counter() - started:.1f}s")

    config = demo_config(len(tokenizer), gamma=gamma, **(config_overrides or {}))
    model = MoEForCausalLM(config)
    counts = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters()) if model.mtp is not None else 0
    say(f"model: {counts / 1e6:.2f}M parameters ({mtp / 1e6:.2f}M in the MTP module), {config.num_hidden_layers} "
        f"layers, {config.n_routed_experts} experts top-{config.num_experts_per_tok}, gamma {gamma:g}")

    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20), weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=logging_steps, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        save_only_model=True, eval_strategy="no", report_to=[], use_cpu=True,
        seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    callback = MoECallback()
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      callbacks=[callback, _PrintLogs(say)])
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    train_output = trainer.train()
    eval_metrics = trainer.evaluate()
    model.eval()

    loader = trainer.get_eval_dataloader()
    eval_loads = expert_load(model, loader)
    metrics: dict[str, float] = {
        "train_loss": train_output.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": math.exp(min(eval_metrics["eval_loss"], 50.0)),
        "eval_max_vio": eval_loads.mean_max_vio(),
        "train_max_vio_first": callback.history[0]["mean_max_vio"] if callback.history else float("nan"),
        "train_max_vio_last": _mean_last(callback.history, 10),
        "train_seconds": train_output.metrics.get("train_runtime", float("nan")),
    }
    if acceptance_prompts and model.mtp is not None:
        prompts = [eval_set[i]["input_ids"][:32] for i in range(min(acceptance_prompts, len(eval_set)))]
        metrics.update(mtp_acceptance(model, prompts, max_new_tokens=16 if quick else 32))

    final = output_dir / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (output_dir / "metrics.json").write_text(json.dumps(
        {**metrics, "eval_expert_load": eval_loads.as_dict()}, indent=2))
    if plots:
        from ..analysis import plot_expert_load, plot_max_vio

        plot_expert_load(eval_loads, output_dir / "expert_load.png", title="Expert load on the eval set")
        plot_max_vio(trainer.state.log_history, output_dir / "max_vio.png")

    say(f"done in {time.perf_counter() - started:.0f}s: eval loss {metrics['eval_loss']:.3f} "
        f"(perplexity {metrics['eval_perplexity']:.1f}); MaxVio first step {metrics['train_max_vio_first']:.3f}, "
        f"last steps {metrics['train_max_vio_last']:.3f}, eval set {metrics['eval_max_vio']:.3f}")
    if "mtp_acceptance" in metrics:
        say(f"MTP speculative decoding: {100 * metrics['mtp_acceptance']:.0f}% of drafts accepted, "
            f"{metrics['mtp_tokens_per_forward']:.2f} tokens per main-model forward (greedy output unchanged)")
    return PretrainResult(model=model, tokenizer=tokenizer, log_history=trainer.state.log_history,
                          callback=callback, eval_loads=eval_loads, metrics=metrics, output_dir=output_dir)


def _mean_last(history: list[dict[str, Any]], count: int) -> float:
    values = [entry["mean_max_vio"] for entry in history[-count:] if not math.isnan(entry["mean_max_vio"])]
    return sum(values) / len(values) if values else float("nan")


def _quietly(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `function` with datasets' progress bars off (restored afterwards)."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        return function(*args, **kwargs)
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()
