"""Upcycle a dense model into an MoE, then finetune with the routed experts frozen.

Right after upcycling every expert is a copy (or a shard) of the dense FFN and the model computes what the
dense one did. "freeze-routed-experts" trains attention, shared experts, dense FFNs, norms, embeddings and head
and leaves the routed experts and the router alone: ST-MoE (Zoph et al. 2022, arXiv 2202.08906 §4) found that
training only the non-MoE parameters matches training all of them, and it keeps the upcycled experts intact.

    python examples/finetune_upcycle.py --dense path/to/llama-or-qwen --data corpus.txt --out upcycled-run
    python examples/finetune_upcycle.py    # offline demo: a tiny random Llama, a generated corpus (~1 min CPU)
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import hf_moe
from hf_moe.training import MoECallback, apply_recipe
from hf_moe.training.data import load_local_texts, token_blocks


def demo_dense(folder: str) -> None:
    """A tiny random Llama (byte vocabulary) saved as a dense checkpoint."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", help="dense checkpoint folder (Llama, Mistral, Qwen2, Qwen3)")
    parser.add_argument("--data", help="local text/jsonl file with a 'text' field (default: generated)")
    parser.add_argument("--out", default="upcycle-run")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--granularity", type=int, default=1)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    dense = args.dense or os.path.join(args.out, "dense")
    if args.dense is None:
        demo_dense(dense)
    moe_dir = os.path.join(args.out, "moe")
    report = hf_moe.upcycle(dense, moe_dir, num_experts=args.experts, top_k=args.top_k,
                            granularity=args.granularity, overwrite=True, progress=False)
    print(report)

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    if args.dense:
        tokenizer = AutoTokenizer.from_pretrained(dense)
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    else:
        encode = lambda text: list(text.encode())  # noqa: E731
    if args.data:
        texts = load_local_texts(args.data)
    else:
        texts = [f"The {i}th line of a small corpus says {i * 7 % 13} is a number." for i in range(300)]
    data = token_blocks(texts, encode, args.block)

    experts_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.experts." in n}
    apply_recipe(model, "freeze-routed-experts")
    training = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=8, max_steps=args.steps,
        learning_rate=1e-3, weight_decay=0.1, logging_steps=10, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    Trainer(model=model, args=training, train_dataset=data, callbacks=[MoECallback()]).train()
    unchanged = all(torch.equal(p, experts_before[n]) for n, p in model.named_parameters() if n in experts_before)
    print(f"routed experts bit-identical after finetuning: {unchanged}")
    model.save_pretrained(os.path.join(args.out, "finetuned"))


if __name__ == "__main__":
    main()
