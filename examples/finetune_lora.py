"""LoRA finetuning of an hf_moe model with peft, then merge back into a plain MoE checkpoint.

`apply_recipe(model, "lora")` puts LoRA (Hu et al. 2021) on the attention and shared-expert projections;
`routed_experts=True` also adapts the fused routed-expert weights (peft's `target_parameters`: one rank-r
update per expert). `merge_and_unload()` folds the adapters in and returns an ordinary MoEForCausalLM.

Router biases (aux-loss-free balancing) are buffers of the frozen base, which a peft adapter does not save: the
recipe leaves them as pretrained by default, so the saved adapter on the base is exactly the trained model.
`--bias-update` keeps balancing on and saves the routers with the adapter (peft's modules_to_save).

    python examples/finetune_lora.py --model path/to/hf_moe-checkpoint --data task.jsonl --routed-experts
    python examples/finetune_lora.py --bias-update   # balancing on; the routers travel with the adapter
    python examples/finetune_lora.py      # offline demo: a tiny random model, a generated task (~1 min CPU)
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_moe
from hf_moe.training import MoECallback, apply_recipe
from hf_moe.training.data import load_local_texts, token_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hf_moe checkpoint folder (default: a tiny random model)")
    parser.add_argument("--data", help="local text/jsonl file with a 'text' field (default: generated)")
    parser.add_argument("--out", default="lora-run")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--routed-experts", action="store_true", help="also adapt the routed experts")
    parser.add_argument("--bias-update", action="store_true",
                        help="keep updating router biases; the routers are saved with the adapter")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    else:
        torch.manual_seed(0)
        model = hf_moe.MoEForCausalLM(hf_moe.MoEConfig(router_bias_update_rate=1e-3,
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1))
        encode = lambda text: list(text.encode())  # noqa: E731
    if args.data:
        texts = load_local_texts(args.data)
    else:
        texts = [f"Q: what is {a} times 3? A: {a * 3}." for a in range(300)]
    data = token_blocks(texts, encode, args.block)

    base_dir = args.model or os.path.join(args.out, "base")  # what the adapter is applied to later
    if not args.model:
        model.save_pretrained(base_dir)
    report = apply_recipe(model, "lora", r=args.rank, lora_alpha=2 * args.rank, routed_experts=args.routed_experts,
                          bias_update=args.bias_update)
    peft_model = report.model
    training = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=8, max_steps=args.steps,
        learning_rate=2e-3, logging_steps=10, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    Trainer(model=peft_model, args=training, train_dataset=data, callbacks=[MoECallback()]).train()
    peft_model.save_pretrained(os.path.join(args.out, "adapter"))  # the adapter (+ the routers with --bias-update)

    probe = torch.tensor([data[0]["input_ids"]])
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(probe).logits
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    fresh = PeftModel.from_pretrained(base, os.path.join(args.out, "adapter")).eval()
    with torch.no_grad():
        round_trip = (fresh(probe).logits - adapted).abs().max().item()
    print(f"base + saved adapter vs trained model: max |logit difference| {round_trip:.2e}")
    merged = peft_model.merge_and_unload()  # a plain MoEForCausalLM again
    merged.save_pretrained(os.path.join(args.out, "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(args.out, "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (reloaded(probe).logits - adapted).abs().max().item()
    print(f"{type(reloaded).__name__} saved in {args.out}/merged; max |logit difference| vs adapter: {difference:.2e}")


if __name__ == "__main__":
    main()
