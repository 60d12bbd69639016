"""Multi-process worker for tests/training/test_ddp.py (CPU, gloo). Run by torchrun, or in one process.

    torchrun --nproc_per_node 2 tests/training/ddp_worker.py OUT    # HF Trainer (DDP), then a loop with FSDP2
    python tests/training/ddp_worker.py OUT                         # the same two runs in one process
    ... OUT --gemm onednn                                           # every product of the fast paths on oneDNN

Every run trains the same tiny model with the ESFT recipe (some expert slices frozen, bias balancing on)
and AdamW (weight decay 0.1) on the same global batches, then saves on every rank `OUT/{mode}-rank{r}.pt`:
the full parameters and buffers (router biases included) after training, and before.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from hf_moe import MoEForCausalLM  # noqa: E402
from hf_moe.training.balancing import update_router_biases  # noqa: E402
from hf_moe.training.recipes import apply_recipe  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

SELECTION = {1: [0, 3, 5], 2: [1, 6]}
GLOBAL_BATCH, SEQ_LEN, STEPS, LR, WEIGHT_DECAY, GAMMA = 4, 12, 4, 1e-2, 0.1, 1e-2


def build_model() -> MoEForCausalLM:
    """The same initial model on every rank, ESFT applied (bias balancing left on)."""
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA))
    apply_recipe(model, "esft", experts=SELECTION, bias_update=True, verbose=False)
    return model


def global_batches() -> torch.Tensor:
    """(STEPS * GLOBAL_BATCH, SEQ_LEN) token ids; step s uses rows [s * B, (s + 1) * B)."""
    return torch.randint(3, 97, (STEPS * GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of parameters and buffers, keyed by name."""
    out = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        out[name] = full.detach().clone()
    return out


def run_trainer(out: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """HF Trainer + MoECallback: the Trainer makes the optimizer (AdamW) and wraps the model in DDP."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_moe.training.callbacks import MoECallback

    model = build_model()
    ids = global_batches()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=os.path.join(out, f"trainer-{world}"), per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS, learning_rate=LR, weight_decay=WEIGHT_DECAY, lr_scheduler_type="constant",
        train_sampling_strategy="sequential", use_cpu=True, ddp_backend="gloo" if world > 1 else None,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[MoECallback()])
    trainer.train()
    return snapshot(model)


def run_loop(out: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Plain loop; with several processes the model is sharded with FSDP2 (experts split over ranks)."""
    model = build_model()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ids, local = global_batches(), GLOBAL_BATCH // world
    model.train()
    for step in range(STEPS):
        batch = ids[step * GLOBAL_BATCH + rank * local: step * GLOBAL_BATCH + (rank + 1) * local]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        update_router_biases(model)
    return snapshot(model)


def use_gemm(name: str) -> None:
    """Every fp32 product of the fast paths on `name` ("onednn": size thresholds at zero, so that this tiny
    model's products take it too)."""
    from hf_moe.kernels.cpu import gemm

    if name == "onednn":
        gemm.MIN_MACS = gemm.MIN_MACS_BUCKETED = 0
    gemm.set_cpu_gemm(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--gemm", default="aten", choices=("aten", "onednn"))
    args = parser.parse_args()
    out = args.out
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    torch.set_num_threads(1)
    use_gemm(args.gemm)
    initial = snapshot(build_model())
    runs = {"trainer": run_trainer(out, rank, world)}
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    runs["fsdp2"] = run_loop(out, rank, world)
    for mode, final in runs.items():
        torch.save({"initial": initial, "final": final}, os.path.join(out, f"{mode}-world{world}-rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
