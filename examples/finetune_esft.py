"""Expert-Specialised Fine-Tuning (ESFT, Wang et al. 2024, arXiv 2407.01906) on a local dataset.

1. score the experts on task samples and keep, per MoE layer, the experts holding the top-p share of the gate
   weight (or of the top-k selections): `select_experts`, saved as JSON;
2. train only those experts (`apply_recipe(model, "esft", experts=...)`) with the HF Trainer;
3. save only what changed (the trained expert rows + a manifest) and re-apply it to the base checkpoint.

    python examples/finetune_esft.py --data my_task.jsonl --model path/to/hf_moe-checkpoint --out esft-run
    python examples/finetune_esft.py        # offline demo: a tiny random model and a generated task (~1 min CPU)

`--data` is a local .jsonl/.json/.csv/.txt file with a "text" field (one document per line for .txt). With
`--model` its tokenizer is used; the demo encodes UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import os
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_moe
from hf_moe.training import (
    MoECallback,
    apply_finetuned_delta,
    apply_recipe,
    save_expert_selection,
    save_finetuned_delta,
    select_experts,
)
from hf_moe.training.data import load_local_texts, token_blocks


def demo_texts(n: int = 200) -> list[str]:
    """A toy "task": arithmetic written out in words."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rng = random.Random(0)
    return [f"{words[a]} plus {words[b]} is {a + b}." for a, b in ((rng.randrange(10), rng.randrange(10))
                                                                    for _ in range(n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hf_moe checkpoint folder (default: a tiny random model)")
    parser.add_argument("--data", help="local task file with a 'text' field (default: a generated toy task)")
    parser.add_argument("--out", default="esft-run")
    parser.add_argument("--criterion", choices=("gate", "token"), default="token")
    parser.add_argument("--threshold", type=float, help="top-p share (ESFT: 0.1 gate, 0.2 token)")
    parser.add_argument("--train-shared-experts", action="store_true")
    parser.add_argument("--train-non-expert", action="store_true")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    if args.data:
        texts = load_local_texts(args.data)
    else:
        texts = demo_texts()
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    else:
        torch.manual_seed(0)
        model = hf_moe.MoEForCausalLM(hf_moe.MoEConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=16,
            num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1))
        encode = lambda text: list(text.encode())  # noqa: E731
    data = token_blocks(texts, encode, args.block)
    os.makedirs(args.out, exist_ok=True)

    # 1. which experts does the task use?
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = select_experts(model, data.select(range(min(64, len(data)))), args.criterion, args.threshold)
    selection_file = os.path.join(args.out, "experts.json")
    save_expert_selection(experts, selection_file, criterion=args.criterion, threshold=args.threshold)
    print(f"selected experts per layer: {experts} -> {selection_file}")

    # 2. train only them (router, attention, shared experts frozen unless asked)
    apply_recipe(model, "esft", experts=selection_file, train_shared_experts=args.train_shared_experts,
                 train_non_expert=args.train_non_expert)
    training = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=8, max_steps=args.steps,
        learning_rate=1e-3, weight_decay=0.1, logging_steps=10, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    Trainer(model=model, args=training, train_dataset=data, callbacks=[MoECallback()]).train()

    # 3. keep only what changed, and put it back onto the base weights
    delta_dir = os.path.join(args.out, "delta")
    manifest = save_finetuned_delta(model, delta_dir, task=args.data or "demo")
    size = sum(os.path.getsize(os.path.join(delta_dir, f)) for f in os.listdir(delta_dir))
    print(f"delta: {len(manifest['tensors'])} tensors, {size / 1e6:.2f} MB in {delta_dir}")
    trained_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(base_state)  # back to the base checkpoint ...
    apply_finetuned_delta(model, delta_dir)  # ... plus the finetuned experts
    same = all(torch.equal(v, trained_state[k]) for k, v in model.state_dict().items())
    print(f"base + delta == finetuned model: {same}")
    if args.model:
        print(f"re-apply later: apply_finetuned_delta(AutoModelForCausalLM.from_pretrained({args.model!r}), "
              f"{delta_dir!r})")


if __name__ == "__main__":
    main()
