"""Worker for tests/modeling/test_routing_balance.py (CPU, gloo): the global-batch balance loss on 2 processes
equals 1 process on the same global batch.

    torchrun --nproc_per_node 2 tests/training/global_balance_worker.py OUT   # each rank: half the batch
    python tests/training/global_balance_worker.py OUT                        # one process: the whole batch

For both scopes it runs one training forward + backward of the same model (aux loss on, bias updates off),
averages the gradients over ranks (what DDP does) and saves `OUT/world{W}-rank{r}.pt`: per scope the aux loss,
the averaged gradients and the routers' global-batch counts.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from hf_moe import MoEForCausalLM  # noqa: E402
from hf_moe.training import find_routers  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

GLOBAL_BATCH, SEQ_LEN = 4, 10


def run(scope: str, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config(aux_loss_alpha=0.1, balance_loss_scope=scope, router_bias_update_rate=0.0))
    model.train()
    ids = torch.randint(3, 97, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    local = ids.chunk(world)[rank]
    out = model(input_ids=local, labels=local)
    out.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone() if param.grad is not None else torch.zeros_like(param)
        if world > 1:
            dist.all_reduce(grad)
            grad /= world
        grads[name] = grad
    counts = {name: router.balance_counts.clone() for name, router in find_routers(model)}
    return {"aux": out.aux_loss.detach(), "grads": grads, "counts": counts}


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    result = {scope: run(scope, rank, world) for scope in ("global_batch", "micro_batch")}
    torch.save(result, os.path.join(out, f"world{world}-rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
