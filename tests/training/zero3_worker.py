"""Worker of tests/training/test_zero3.py: HF Trainer + DeepSpeed ZeRO-3 on CPU (gloo), 2 processes, MoECallback
(which marks the MoE blocks as ZeRO-3 leaves). Writes each rank's losses and router biases as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

from hf_moe import MoEForCausalLM
from hf_moe.training import MoECallback, find_routers
from tests.conftest import tiny_config


def main() -> None:
    out = sys.argv[1]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}
    args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                             deepspeed=zero3, ddp_backend="gloo")
    model = MoEForCausalLM(tiny_config(router_bias_update_rate=1e-3, num_nextn_predict_layers=1, aux_loss_alpha=0.01))
    ids = torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MoECallback()])
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    report = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "moe_keys": sorted({k for entry in trainer.state.log_history for k in entry if k.startswith("moe/")}),
        "biases": [router.e_score_correction_bias.tolist() for _, router in find_routers(model)],
        "leaves": sum(bool(getattr(m, "_z3_leaf", False)) for m in model.modules()),
        "engine": type(trainer.model_wrapped).__name__,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main()
