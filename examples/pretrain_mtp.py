"""Pretrain a small DeepSeek-V3-style MoE with multi-token prediction from scratch, offline, on a CPU.

Corpus: Python's own standard-library sources (found on every machine with Python), read with `datasets`'
local "text" loader; tokenizer: byte-level BPE trained on them with `tokenizers`. Model: MLA, a sigmoid
router with group-limited top-4 of 16 experts + 1 shared expert, auxiliary-loss-free bias balancing
(gamma 1e-3, updated once per optimizer step by `MoECallback`), a 1e-4 sequence-wise balance loss, and one
MTP module (lambda 0.3). It prints loss (LM, MTP, aux) and MaxVio as it trains, then the eval loss, the eval
set's MaxVio, and how many MTP drafts the model accepts in self-speculative greedy decoding.

    python examples/pretrain_mtp.py --out runs/pretrain            # ~300 steps: a few minutes on a laptop CPU
    python examples/pretrain_mtp.py --quick                        # 30-step smoke run (~1 min)
    python examples/pretrain_mtp.py --gamma 0 --out runs/no-bias   # compare: balancing switched off
    python examples/pretrain_mtp.py --plots                        # + expert_load.png, max_vio.png (needs matplotlib)

Library use (what `hf-moe demo` calls): `hf_moe.demo.recipe.run_pretraining(output_dir, max_steps=...)`.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from hf_moe.demo.recipe import run_pretraining


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small corpus, at most 30 steps")
    parser.add_argument("--gamma", type=float, default=1e-3, help="bias update rate; 0 disables balancing")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--corpus-mb", type=float, default=None, help="MB of standard-library source to use")
    parser.add_argument("--plots", action="store_true", help="write expert_load.png and max_vio.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    output_dir = args.out or tempfile.mkdtemp(prefix="hf_moe_pretrain_")
    result = run_pretraining(
        output_dir, max_steps=args.max_steps, quick=args.quick, gamma=args.gamma, batch_size=args.batch_size,
        block_size=args.block_size, learning_rate=args.lr, seed=args.seed, plots=args.plots,
        corpus_bytes=int(args.corpus_mb * 1e6) if args.corpus_mb else None,
    )
    sample = result.tokenizer("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    generated = result.model.generate_with_mtp(sample, max_new_tokens=40)
    print("sample (greedy, MTP-speculative):\n" + result.tokenizer.decode(generated.sequences[0]))
    print(f"model, tokenizer and metrics in {output_dir}")
    print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}, indent=2))
    return result.metrics


if __name__ == "__main__":
    main()
