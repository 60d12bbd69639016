"""Supervised finetuning of an hf_moe model with TRL's SFTTrainer: the whole objective trains, no subclass needed.

TRL's trainers replace the LM head with their fused one (`add_fused_lm_head`); an hf_moe model serves that head
itself (`MoEForCausalLM.forward(fused_lm_head=True)`), so the loss is TRL's NLL + the MTP loss + hf_moe's balance
terms, and `MoECallback` updates the router biases and logs `moe/lm_loss`, `moe/mtp_loss`, `moe/aux_loss`,
`moe/max_vio`. Leave TRL's `router_aux_loss_coef` unset: hf_moe weights its terms with `mtp_loss_weight`,
`aux_loss_alpha`, `seq_aux_loss_alpha`, ... (any other value is refused).

    python examples/finetune_sft_trl.py --model path/to/hf_moe-checkpoint --data task.jsonl   # prompt/completion
    python examples/finetune_sft_trl.py      # offline demo: a tiny random model and a generated task (CPU, seconds)
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import hf_moe
from hf_moe.training import MoECallback


def word_tokenizer(texts: list[str]):  # noqa: ANN201 - a PreTrainedTokenizerFast, one token per word
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in texts for word in text.split()})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hf_moe checkpoint folder with a tokenizer (default: a tiny random model)")
    parser.add_argument("--data", help="local jsonl file with 'prompt' and 'completion' fields (default: generated)")
    parser.add_argument("--out", default="sft-run")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    if args.data:
        with open(args.data, encoding="utf-8") as file:
            rows = [json.loads(line) for line in file if line.strip()]
    else:
        rows = [{"prompt": f"what is {a} times 3 ?", "completion": f" {a * 3}"} for a in range(200)]
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        tokenizer = word_tokenizer([row["prompt"] + row["completion"] for row in rows])
        torch.manual_seed(0)
        model = hf_moe.MoEForCausalLM(hf_moe.MoEConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, num_nextn_predict_layers=1, seq_aux_loss_alpha=1e-3,
            router_bias_update_rate=1e-3, pad_token_id=0, bos_token_id=1, eos_token_id=2))

    config = SFTConfig(output_dir=os.path.join(args.out, "trainer"), max_steps=args.steps, per_device_train_batch_size=8,
                       learning_rate=2e-3, logging_steps=max(1, min(10, args.steps)), save_strategy="no",
                       report_to=[], use_cpu=not torch.cuda.is_available(), max_length=64)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[MoECallback()])
    trainer.train()
    last = next(entry for entry in reversed(trainer.state.log_history) if "moe/mtp_loss" in entry)
    print("last log: " + ", ".join(f"{key} {last[key]:.4f}" for key in
                                   ("loss", "moe/lm_loss", "moe/mtp_loss", "moe/aux_loss", "moe/max_vio")))
    trainer.save_model(os.path.join(args.out, "model"))  # loads with hf_moe, or anywhere with trust_remote_code=True


if __name__ == "__main__":
    main()
