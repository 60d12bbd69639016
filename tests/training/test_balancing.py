"""Auxiliary-loss-free balancing: counters, the sign update, DDP reduction, accumulation, checkpointing."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_moe import MoEForCausalLM
from hf_moe.training import ExpertLoads, expert_load, find_routers, max_violation, update_router_biases
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention


GAMMA = 2.0**-8  # a power of two: b + k * gamma is exact in fp32, so "moves by exactly gamma" is testable


def counters(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([router.tokens_per_expert.clone() for _, router in find_routers(model)])


def biases(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([router.e_score_correction_bias.clone() for _, router in find_routers(model)])


def train_steps(model: MoEForCausalLM, batches: torch.Tensor, micro: int = 1, lr: float = 1e-2) -> list[ExpertLoads]:
    """Plain loop: for each step, `micro` micro-batches (loss / micro), one SGD step, one bias update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    loads = []
    for step_batch in batches:
        for chunk in step_batch.chunk(micro):
            (model(input_ids=chunk, labels=chunk).loss / micro).backward()
        optimizer.step()
        optimizer.zero_grad()
        loads.append(update_router_biases(model))
    return loads


def test_routers_are_found_in_layers_and_mtp_blocks() -> None:
    model = MoEForCausalLM(tiny_config(num_nextn_predict_layers=2))
    names = [name for name, _ in find_routers(model)]
    assert names == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "mtp.0.block.mlp.gate",
                     "mtp.1.block.mlp.gate"]
    assert ExpertLoads(names, torch.ones(4, 8)).labels == ["layer_1", "layer_2", "mtp_0", "mtp_1"]


def test_sign_update_moves_each_bias_by_exactly_gamma_in_fp32() -> None:
    model = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA)).to(torch.bfloat16)
    routers = [router for _, router in find_routers(model)]
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in routers)  # kept fp32 through .to()
    assert all(r.tokens_per_expert.dtype == torch.float32 for r in routers)
    routers[0].tokens_per_expert.copy_(torch.tensor([10.0, 0, 5, 5, 5, 5, 2, 8]))  # mean 5
    routers[1].tokens_per_expert.copy_(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 12]))  # mean 5
    loads = update_router_biases(model)

    assert torch.equal(loads.loads[0], torch.tensor([10.0, 0, 5, 5, 5, 5, 2, 8]))
    g = GAMMA
    assert torch.equal(routers[0].e_score_correction_bias, torch.tensor([-g, g, 0, 0, 0, 0, g, -g]))
    assert torch.equal(routers[1].e_score_correction_bias, torch.tensor([g, g, g, g, 0, -g, -g, -g]))
    assert counters(model).abs().sum() == 0  # counters reset
    loads.loads.zero_()  # the returned loads are a copy, not the counters
    routers[0].tokens_per_expert.copy_(torch.tensor([10.0, 0, 5, 5, 5, 5, 2, 8]))
    update_router_biases(model)
    assert torch.equal(routers[0].e_score_correction_bias, torch.tensor([-2 * g, 2 * g, 0, 0, 0, 0, 2 * g, -2 * g]))
    assert torch.equal(routers[1].e_score_correction_bias, torch.tensor([g, g, g, g, 0, -g, -g, -g]))  # no tokens


def test_default_gamma_step_is_the_fp32_value_of_1e_3() -> None:
    model = MoEForCausalLM(tiny_config())  # router_bias_update_rate defaults to 1e-3
    router = find_routers(model)[0][1]
    router.tokens_per_expert.copy_(torch.arange(8.0))
    update_router_biases(model)
    step = torch.tensor(1e-3, dtype=torch.float32)
    assert torch.equal(router.e_score_correction_bias, torch.cat((step.repeat(4), -step.repeat(4))))


def test_zero_mean_variant_and_rate_zero() -> None:
    model = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA, router_bias_update_zero_mean=True))
    router = find_routers(model)[0][1]
    load = torch.tensor([9.0, 0, 0, 0, 0, 0, 0, 7])  # mean 2: sign = [-1, 1, 1, 1, 1, 1, 1, -1], mean 0.5
    router.tokens_per_expert.copy_(load)
    update_router_biases(model)
    expected = (torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, -1]) - 0.5) * GAMMA
    assert torch.equal(router.e_score_correction_bias, expected)
    assert router.e_score_correction_bias.sum().abs() < 1e-9

    disabled = MoEForCausalLM(tiny_config(router_bias_update_rate=0.0))
    router = find_routers(disabled)[0][1]
    router.tokens_per_expert.copy_(load)
    loads = update_router_biases(disabled)
    assert torch.equal(loads.loads[0], load)  # still measured
    assert router.e_score_correction_bias.abs().sum() == 0 and router.tokens_per_expert.abs().sum() == 0
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        update_router_biases(disabled, rate=-1.0)


def test_only_training_forwards_with_grad_count_tokens() -> None:
    model = MoEForCausalLM(tiny_config(num_nextn_predict_layers=1))
    ids = torch.randint(3, 97, (2, 6))
    model.eval()
    model(input_ids=ids, labels=ids)
    model.train()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    assert counters(model).sum() == 0
    model(input_ids=ids, labels=ids).loss.backward()
    # every token chooses K=2 experts in each MoE layer (2 decoder layers); the MTP block counts only the
    # positions whose input t_{i+1} exists (5 of 6 per sequence)
    assert counters(model).sum(dim=-1).tolist() == [24.0, 24.0, 20.0]
    topk = model(input_ids=ids).routings[0].topk_ids
    assert torch.equal(counters(model)[0], 2 * torch.bincount(topk.flatten(), minlength=8).float())


def test_gradient_checkpointing_does_not_count_the_recompute_and_gives_identical_biases() -> None:
    batches = torch.randint(3, 97, (3, 4, 10), generator=torch.Generator().manual_seed(1))
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA, num_nextn_predict_layers=1))
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.layers[1].gradient_checkpointing
        loads = train_steps(model, batches)
        assert all(step.loads.sum(dim=-1).tolist() == [80.0, 80.0, 72.0] for step in loads)  # 4*10 tokens * K; MTP: 4*9
        runs.append((biases(model), [step.loads for step in loads]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert runs[0][0].abs().sum() > 0


def test_gradient_accumulation_gives_the_biases_of_one_batch() -> None:
    batches = torch.randint(3, 97, (3, 8, 10), generator=torch.Generator().manual_seed(2))
    results = []
    for micro in (1, 4):
        torch.manual_seed(0)
        model = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA))
        loads = train_steps(model, batches, micro=micro)
        results.append((biases(model), torch.stack([step.loads for step in loads]), model))
    (bias_one, loads_one, one), (bias_acc, loads_acc, acc) = results
    assert torch.equal(loads_one, loads_acc)  # the update sees the whole optimizer step's tokens
    assert torch.equal(bias_one, bias_acc)
    steps_taken = bias_one / GAMMA  # three steps of +-gamma or 0 each: integers in [-3, 3]
    assert torch.equal(steps_taken, steps_taken.round()) and steps_taken.abs().max() <= 3 and bias_one.any()
    for (name, p1), p2 in zip(one.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=name)


def test_one_all_reduce_of_all_layers_when_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    model = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA, num_nextn_predict_layers=1))
    for i, (_, router) in enumerate(find_routers(model)):
        router.tokens_per_expert.copy_(torch.arange(8.0) * (i + 1))
    calls = []

    def fake_all_reduce(tensor: torch.Tensor, op: object = None, group: object = None) -> None:
        calls.append(tuple(tensor.shape))
        tensor.mul_(3)  # as if three ranks had the same counts

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    loads = update_router_biases(model)
    assert calls == [(3, 8)]
    assert torch.equal(loads.loads[2], torch.arange(8.0) * 9)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA))
        for layer, (_, router) in enumerate(find_routers(model)):
            # layer 0: rank 0 counts [1,1,1,1,0,0,0,0], rank 1 [0,0,0,0,11,1,1,1]
            local = torch.zeros(8)
            local[rank * 4:(rank + 1) * 4] = 1.0 + layer
            if rank == 1:
                local[4] += 10.0
            router.tokens_per_expert.copy_(local)
        loads = update_router_biases(model)
        torch.save({"bias": biases(model), "loads": loads.loads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_sum_counts_and_end_with_identical_biases() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method="fork")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert torch.equal(results[0]["bias"], results[1]["bias"])
    assert torch.equal(results[0]["loads"][0], torch.tensor([1.0, 1, 1, 1, 11, 1, 1, 1]))
    g = GAMMA
    assert torch.equal(results[0]["bias"][0], torch.tensor([g, g, g, g, -g, g, g, g]))  # mean 2.25


def skewed_router_task(model: MoEForCausalLM, sample: torch.Tensor, strength: float = 1.0) -> None:
    """Make a random router route unevenly: add to expert i's row a multiple (from +strength to -strength
    logits) of the mean router input, so the first experts win for most tokens."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [router.register_forward_pre_hook(lambda _m, args, n=name: inputs.__setitem__(n, args[0].detach()))
             for name, router in find_routers(model)]
    with torch.no_grad():
        model(input_ids=sample)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for name, router in find_routers(model):
            mean = inputs[name].float().mean(dim=0)
            offsets = torch.linspace(strength, -strength, router.num_experts)
            router.weight.add_(offsets[:, None] * mean[None, :] / mean.pow(2).sum())


def test_bias_balancing_ends_with_far_lower_max_vio() -> None:
    torch.set_num_threads(1)
    batches = torch.randint(3, 97, (30, 8, 32), generator=torch.Generator().manual_seed(1))
    eval_set = [{"input_ids": torch.randint(3, 97, (16, 64), generator=torch.Generator().manual_seed(2))}]
    max_vio = {}
    for gamma in (0.0, 0.02):
        torch.manual_seed(0)
        model = MoEForCausalLM(tiny_config(router_bias_update_rate=gamma, n_group=1, topk_group=1))
        skewed_router_task(model, batches[0])
        if gamma == 0.0:
            assert expert_load(model, eval_set).mean_max_vio() > 1.5  # the task is unbalanced to start with
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        for batch in batches:
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            update_router_biases(model)
        max_vio[gamma] = expert_load(model, eval_set).mean_max_vio()
    assert max_vio[0.02] < 0.35 * max_vio[0.0] and max_vio[0.02] < 0.6, max_vio


def test_max_violation_definition() -> None:
    loads = torch.tensor([[4.0, 4, 4, 4], [8.0, 4, 2, 2], [0.0, 0, 0, 0]])
    vio = max_violation(loads)
    assert vio[0] == 0 and vio[1] == 8 / 4 - 1 and vio[2].isnan()
    assert ExpertLoads(["model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "mtp.0.block.mlp.gate"],
                       loads).mean_max_vio() == 0.5


def test_accelerate_loop_updates_once_per_synced_step() -> None:
    """With accelerate, call `update_router_biases` when `accelerator.sync_gradients` (after the optimizer step
    of the last micro-batch): the biases are those of the plain loop."""
    from accelerate import Accelerator

    batches = torch.randint(3, 97, (3, 8, 10), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    reference = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA))
    train_steps(reference, batches, micro=2)

    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA)).train()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    wrapped, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1e-2))
    updates = 0
    for micro_batch in batches.reshape(6, 4, 10):
        with accelerator.accumulate(wrapped):
            accelerator.backward(wrapped(input_ids=micro_batch, labels=micro_batch).loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            update_router_biases(wrapped)
            updates += 1
    assert updates == 3
    assert torch.equal(biases(model), biases(reference))


def test_padding_tokens_are_not_counted_as_expert_load() -> None:
    model = MoEForCausalLM(tiny_config(num_nextn_predict_layers=1)).train()
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # 3 left-padding tokens in the first sequence
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    # 9 real tokens x K=2 in each decoder MoE layer; the MTP block: real positions whose next token is real (7)
    assert counters(model).sum(dim=-1).tolist() == [18.0, 18.0, 14.0]


def test_frozen_and_excluded_routers_keep_their_bias_but_their_counters_reset() -> None:
    from hf_moe.training import apply_recipe, freeze_router_biases

    model = MoEForCausalLM(tiny_config(router_bias_update_rate=GAMMA))
    names = [name for name, _ in find_routers(model)]
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))

    def step(**options: object) -> torch.Tensor:
        before = biases(model)
        model.train()(input_ids=ids, labels=ids).loss.backward()
        loads = update_router_biases(model, **options)
        assert loads.loads.sum() > 0 and counters(model).sum() == 0  # read, summed and reset all the same
        return (biases(model) - before).abs().sum(dim=-1) > 0  # (L,) which routers moved

    assert step().tolist() == [True, True]
    assert step(exclude=[names[0]]).tolist() == [False, True]  # this call only
    assert freeze_router_biases(model, names=[names[1]]) == [names[1]]
    assert step().tolist() == [True, False]
    assert step(skip_frozen=False).tolist() == [True, True]
    with pytest.raises(ValueError, match="no router named"):
        freeze_router_biases(model, names=["model.layers.9.mlp.gate"])
    # the freeze-router recipe: a frozen router must not move; bias_update=True opts back in
    apply_recipe(model, "freeze-router", verbose=False)
    assert model.config.router_bias_update_rate == 0 and all(r.bias_frozen for _, r in find_routers(model))
    assert step(rate=GAMMA).tolist() == [False, False]  # marked: even an explicit rate leaves them alone
    model.config.router_bias_update_rate = GAMMA
    apply_recipe(model, "freeze-router", bias_update=True, verbose=False)
    assert step().tolist() == [True, True]
    apply_recipe(model, "full", verbose=False)  # recipes do not stack: unmarked again
    assert not any(r.bias_frozen for _, r in find_routers(model))


def test_global_balance_scope_makes_one_all_reduce_of_all_layers_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = MoEForCausalLM(tiny_config(aux_loss_alpha=0.01, balance_loss_scope="global_batch")).train()
    calls = []

    def fake_all_reduce(tensor: torch.Tensor, op: object = None, group: object = None) -> None:
        calls.append(tuple(tensor.shape))
        tensor.mul_(2)  # as if two ranks had the same counts

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids)
    assert calls == [(2, 8 + 4 + 1)]  # 2 MoE layers x [8 expert counts, 4 device counts, tokens]
    assert all(r.balance_counts[-1] == 32 for _, r in find_routers(model))  # 16 tokens on each of "2 ranks"
    update_router_biases(model)
    assert all(r.balance_counts.abs().sum() == 0 for _, r in find_routers(model))
