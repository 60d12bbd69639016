"""Balancing study at CPU scale: Wang et al. 2024 (arXiv 2408.15664) Table 2's comparison, and its neighbours.

The same small MoE model trains on the same local text (Python's standard-library sources, tokenized with a
byte-level BPE trained on them: `hf_moe.demo.corpus`), same seed, same batches, with:

    (a) softmax router + aux loss            (b) sigmoid router + aux loss
    (c) sigmoid router + loss-free bias      (d) sigmoid router, no balancing
    (e) hash routing (Roller et al. 2021)    (f) sigmoid router + global-batch aux loss (Qiu et al. 2025)

and reports validation perplexity, MaxVio_global (over the whole validation set, mean over MoE layers) and
MaxVio_batch (per training step: every micro-batch of the step counted, mean over layers, averaged over the
second half of training), plus a plot. Every optimizer step accumulates `--micro` micro-batches, so the global
scope (f over the step's micro-batches) differs from the micro-batch one.

    python benchmarks/balancing_study.py                  # the full study (~10-15 min on 2 busy cores)
    python benchmarks/balancing_study.py --steps 20       # a smoke run

Writes benchmarks/results/balancing_study.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from hf_moe import MoEConfig, MoEForCausalLM
from hf_moe.demo.corpus import stdlib_sources, train_tokenizer
from hf_moe.training import expert_load, find_routers, update_router_biases

RESULTS = Path(__file__).parent / "results"

RUNS = {  # name -> (description, MoEConfig overrides)
    "a": ("softmax + aux loss", dict(scoring_func="softmax", aux_loss_alpha=0.01)),
    "b": ("sigmoid + aux loss", dict(aux_loss_alpha=0.01)),
    "c": ("sigmoid + loss-free bias", dict(router_bias_update_rate=1e-2)),
    "d": ("sigmoid, no balancing", dict()),
    "e": ("hash routing", dict(router_type="hash")),
    "f": ("sigmoid + global-batch aux loss", dict(aux_loss_alpha=0.01, balance_loss_scope="global_batch")),
}


def model_config(vocab_size: int, **overrides: object) -> MoEConfig:
    fields: dict = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        attention_type="gqa", num_key_value_heads=2, head_dim=32, n_routed_experts=16, num_experts_per_tok=2,
        moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="sigmoid", norm_topk_prob=True, router_bias_update_rate=0.0,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    fields.update(overrides)
    return MoEConfig(**fields)


def token_blocks(max_bytes: int, vocab_size: int, block: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(train blocks, validation blocks) of `block` tokens: the files' token stream, the last 10% of the files
    held out for validation (whole files, so no text is shared)."""
    files = stdlib_sources(max_bytes=max_bytes)
    tokenizer = train_tokenizer(files, vocab_size=vocab_size)
    split = int(len(files) * 0.9)

    def blocks(paths: list[Path]) -> torch.Tensor:
        stream: list[int] = []
        for path in paths:
            stream += tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
            stream.append(tokenizer.eos_token_id)
        usable = len(stream) // block * block
        return torch.tensor(stream[:usable]).view(-1, block)

    return blocks(files[:split]), blocks(files[split:]), tokenizer


def train_run(name: str, overrides: dict, train: torch.Tensor, val: torch.Tensor, vocab: int, args) -> dict:  # noqa: ANN001
    torch.manual_seed(0)
    model = MoEForCausalLM(model_config(vocab, **overrides))
    if overrides.get("router_type") == "hash":  # Roller et al.'s best table: balanced by token frequency
        counts = torch.bincount(train.reshape(-1), minlength=vocab).float()
        for _, router in find_routers(model):
            router.rebalance(counts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    generator = torch.Generator().manual_seed(1)  # the same batches for every run
    model.train()
    update_router_biases(model, rate=0.0)
    history, start = [], time.perf_counter()
    for step in range(args.steps):
        rows = torch.randint(0, train.shape[0], (args.batch * args.micro,), generator=generator)
        lm = 0.0
        for chunk in train[rows].chunk(args.micro):
            out = model(input_ids=chunk, labels=chunk)
            (out.loss / args.micro).backward()
            lm += out.lm_loss.item() / args.micro
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        loads = update_router_biases(model)  # the bias update of (c); for the others it reads and resets
        history.append({"step": step + 1, "lm_loss": lm, "max_vio_batch": loads.mean_max_vio()})
        if (step + 1) % 50 == 0:
            print(f"  ({name}) step {step + 1}: lm {lm:.3f}, MaxVio_batch {history[-1]['max_vio_batch']:.3f}",
                  flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for chunk in val.split(args.batch):
            out = model(input_ids=chunk, labels=chunk)
            n = chunk[:, 1:].numel()
            total, tokens = total + out.lm_loss.item() * n, tokens + n
    batches = [{"input_ids": chunk} for chunk in val.split(args.batch)]
    global_loads = expert_load(model, batches)
    half = history[len(history) // 2:]
    return {
        "run": name, "description": RUNS[name][0], "config": overrides,
        "val_ppl": math.exp(total / tokens), "val_loss": total / tokens,
        "max_vio_global": global_loads.mean_max_vio(),
        "max_vio_global_per_layer": [round(v, 4) for v in global_loads.max_vio.tolist()],
        "max_vio_batch": sum(h["max_vio_batch"] for h in half) / len(half),
        "train_seconds": seconds, "history": history,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps = [h["step"] for h in r["history"]]
        vio = [h["max_vio_batch"] for h in r["history"]]
        smooth = [sum(vio[max(0, i - 9):i + 1]) / len(vio[max(0, i - 9):i + 1]) for i in range(len(vio))]
        left.plot(steps, smooth, label=f"({r['run']}) {r['description']}")
    left.set_xlabel("optimizer step")
    left.set_ylabel("MaxVio_batch (10-step mean, mean over layers)")
    left.set_yscale("log")
    left.legend(fontsize=8)
    for r in results:
        right.scatter(r["max_vio_global"], r["val_ppl"], s=40)
        right.annotate(f"({r['run']})", (r["max_vio_global"], r["val_ppl"]), textcoords="offset points",
                       xytext=(5, 3))
    right.set_xlabel("MaxVio_global (validation set)")
    right.set_ylabel("validation perplexity")
    right.set_title("lower left is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores (shared), torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def markdown(results: list[dict], args, meta: dict) -> str:  # noqa: ANN001
    lines = [
        "# Balancing study (CPU scale): Wang et al. 2024 Table 2 and neighbours",
        "",
        f"Machine: {meta['machine']}. One run of `python benchmarks/balancing_study.py` ({meta['date']}), "
        f"{meta['total_minutes']:.1f} min in all.",
        f"Model: {meta['params'] / 1e6:.2f}M parameters, 4 layers (1 dense + 3 MoE), 16 routed experts top-2 + "
        f"1 shared, hidden 128; {args.steps} steps of {args.micro} x {args.batch} sequences x {args.block} tokens "
        f"(stdlib Python sources, BPE vocab {args.vocab}); validation: {meta['val_tokens']} held-out tokens.",
        "Aux loss alpha 0.01; loss-free gamma 1e-2 (the paper's 1e-3 is for ~100x more steps).",
        "",
        "| run | routing / balancing | val ppl | MaxVio_global | MaxVio_batch | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| ({r['run']}) | {r['description']} | {r['val_ppl']:.2f} | {r['max_vio_global']:.3f} | "
                     f"{r['max_vio_batch']:.3f} | {r['train_seconds']:.0f} |")
    lines += ["", "Paper (1B, Table 2): aux loss ppl 9.56 / MaxVio_global 0.72; loss-free 9.50 / 0.04.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--bytes", type=int, default=3_000_000, help="stdlib source bytes to use")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--runs", default="abcdef")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    train, val, _ = token_blocks(args.bytes, args.vocab, args.block)
    val = val[:64]  # 64 held-out blocks
    print(f"train blocks {tuple(train.shape)}, validation blocks {tuple(val.shape)}", flush=True)
    results = []
    for name in args.runs:
        print(f"run ({name}) {RUNS[name][0]}", flush=True)
        results.append(train_run(name, RUNS[name][1], train, val, args.vocab, args))
        r = results[-1]
        print(f"  -> val ppl {r['val_ppl']:.2f}, MaxVio_global {r['max_vio_global']:.3f}, "
              f"MaxVio_batch {r['max_vio_batch']:.3f}, {r['train_seconds']:.0f}s", flush=True)
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "total_minutes": (time.perf_counter() - began) / 60, "val_tokens": int(val.numel()),
            "params": sum(p.numel() for p in MoEForCausalLM(model_config(args.vocab)).parameters()),
            "args": vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "balancing_study.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "balancing_study.md").write_text(markdown(results, args, meta))
    plot(results, out / "balancing_study.png")
    print(markdown(results, args, meta))


if __name__ == "__main__":
    main()
