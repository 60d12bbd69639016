"""Balance-loss scope and the communication balance loss: hand-computed examples, gradient flow, the global
batch's frequencies over micro-batches and processes, and a short run where device loads move toward uniform."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.modeling.losses import (
    affinities,
    communication_balance_loss,
    device_token_counts,
    expert_balance_loss,
    expert_frequency,
)
from hf_moe.training import find_routers, max_violation, update_router_biases
from tests.conftest import tiny_config

WORKER = Path(__file__).parents[1] / "training" / "global_balance_worker.py"
ROOT = WORKER.parents[2]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# -------------------------------------------------------------------------------------- communication balance
def test_device_token_counts_count_a_token_once_per_device() -> None:
    # 4 experts on 2 devices (0-1, 2-3): token 0 uses experts 0 and 1 (device 0 once), token 1 experts 1 and 2
    ids = torch.tensor([[0, 1], [1, 2], [3, 2]])
    assert device_token_counts(ids, 4, 2).tolist() == [2.0, 2.0]


def test_communication_balance_loss_by_hand() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.4, 0.4]])
    # M = 1 device per token, T = 2; device 0 got 2 tokens, device 1 got 0: f'' = D/(M T) * counts = [2, 0]
    # P'' = sum over the device's experts of the mean prob: [(0.4+0.1+0.3+0.1)/2, (0.2+0.4+0.1+0.4)/2] = [0.45, 0.55]
    loss = communication_balance_loss(probs, torch.tensor([2.0, 0.0]), 2, 1)
    assert loss.item() == pytest.approx(2 * 0.45)
    uniform = communication_balance_loss(torch.full((2, 4), 0.25), torch.tensor([1.0, 1.0]), 2, 1)
    assert uniform.item() == pytest.approx(1.0)  # balanced devices: exactly 1


def test_communication_balance_loss_in_the_model_has_gradient_and_its_value() -> None:
    torch.manual_seed(0)
    config = tiny_config(comm_balance_alpha=0.5, scoring_func="softmax", topk_method="group_limited_greedy",
                         n_group=4, topk_group=2, router_bias_update_rate=0.0)
    model = MoEForCausalLM(config).train()
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    expected = sum(
        0.5 * communication_balance_loss(affinities(r.logits, "softmax"), device_token_counts(r.topk_ids, 8, 4), 12, 2)
        for r in out.routings)
    torch.testing.assert_close(out.aux_loss, expected)
    out.aux_loss.backward()
    assert all(r.weight.grad.abs().sum() > 0 for _, r in find_routers(model))


def device_max_vio(loads: torch.Tensor, devices: int) -> float:
    """Mean over layers of MaxVio of the tokens sent to each device (experts' loads summed per device)."""
    return max_violation(loads.view(loads.shape[0], devices, -1).sum(-1)).mean().item()


def test_communication_balance_moves_device_loads_toward_uniform() -> None:
    """Routers start skewed toward device 0; with the loss the device loads end closer to uniform than without."""

    def run(alpha: float) -> tuple[float, float]:
        torch.manual_seed(0)
        config = tiny_config(comm_balance_alpha=alpha, scoring_func="softmax", topk_method="group_limited_greedy",
                             n_group=4, topk_group=1, num_experts_per_tok=2, router_bias_update_rate=0.0)
        model = MoEForCausalLM(config)
        with torch.no_grad():
            for _, router in find_routers(model):
                router.weight.mul_(0.1)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 97, (8, 16), generator=generator)
        with torch.no_grad():  # skew: device 0's experts get the mean router input direction
            hidden = []
            handles = [r.register_forward_hook(lambda m, a, o: hidden.append(a[0].mean(0))) for _, r in find_routers(model)]
            model.eval()(input_ids=ids)
            for handle in handles:
                handle.remove()
            for (_, router), h in zip(find_routers(model), hidden):
                router.weight[:2] += 4 * h / h.norm() ** 2
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        update_router_biases(model, rate=0.0)
        vio = []
        for _ in range(25):
            ids = torch.randint(3, 97, (8, 16), generator=generator)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            vio.append(device_max_vio(update_router_biases(model).loads, 4))
        return vio[0], sum(vio[-10:]) / 10

    start, with_loss = run(0.1)
    _, without = run(0.0)
    # measured: start 1.64 (3 = every token on one device); last 10 steps 0.8 with the loss, 2.6 without
    assert start > 1.2
    assert with_loss < 0.5 * without and with_loss < 0.75 * start


# -------------------------------------------------------------------------------------------- global scope
def scoped_model(scope: str, **overrides: object) -> MoEForCausalLM:
    torch.manual_seed(0)
    fields = dict(aux_loss_alpha=0.1, balance_loss_scope=scope, router_bias_update_rate=0.0)
    fields.update(overrides)
    return MoEForCausalLM(tiny_config(**fields)).train()


def test_accumulation_of_n_micro_batches_of_1_gives_the_f_of_1_batch_of_n() -> None:
    ids = torch.randint(3, 97, (4, 10), generator=torch.Generator().manual_seed(0))
    model = scoped_model("global_batch")
    whole = model(input_ids=ids, labels=ids)
    whole_counts = [r.balance_counts.clone() for _, r in find_routers(model)]
    update_router_biases(model)  # the step ends: buffers zeroed
    assert all(r.balance_counts.abs().sum() == 0 for _, r in find_routers(model))
    for row in range(4):
        last = model(input_ids=ids[row:row + 1], labels=ids[row:row + 1])
    for (_, router), counts in zip(find_routers(model), whole_counts):
        torch.testing.assert_close(router.balance_counts, counts)  # the step's f: N x 1 == 1 x N
        assert counts[-1] == 40 and counts[:8].sum() == 80  # 40 tokens, K = 2
    # the last micro-batch's loss uses that global f with its own (local) P
    expected = sum(0.1 * expert_balance_loss(affinities(r.logits, "sigmoid"), torch.zeros(10, 8), 2,
                                             expert_frequency(c[:8], c[-1], 2))
                   for r, c in zip(last.routings, whole_counts))
    torch.testing.assert_close(last.aux_loss, expected)
    # one batch of 4 in the global scope (a fresh step) is the micro-batch scope's loss
    update_router_biases(model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).aux_loss, whole.aux_loss)
    local = scoped_model("micro_batch")
    torch.testing.assert_close(local(input_ids=ids, labels=ids).aux_loss, whole.aux_loss)


def test_global_scope_leaves_the_buffers_alone_outside_training_forwards() -> None:
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    model = scoped_model("global_batch", output_router_logits=True)
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    model.eval()(input_ids=ids, labels=ids)
    assert all(r.balance_counts.abs().sum() == 0 for _, r in find_routers(model))


def test_micro_batch_scope_pushes_each_micro_batch_and_global_scope_does_not() -> None:
    """Two micro-batches with opposite routing: each alone is skewed, together balanced. The micro-batch scope
    gives the second a large loss; the global scope (f over both) gives it less."""
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    losses = {}
    for scope in ("micro_batch", "global_batch"):
        model = scoped_model(scope)
        model(input_ids=ids[:1], labels=ids[:1])
        losses[scope] = model(input_ids=ids[1:], labels=ids[1:]).aux_loss.item()
    assert losses["micro_batch"] != pytest.approx(losses["global_batch"])


def run_worker(command: list[str], out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([*command, str(WORKER), str(out)], cwd=out, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path) -> None:
    run_worker([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path)
    run_worker([sys.executable], tmp_path)
    single = torch.load(tmp_path / "world1-rank0.pt")
    for scope in ("global_batch", "micro_batch"):
        ranks = [torch.load(tmp_path / f"world2-rank{r}.pt")[scope] for r in (0, 1)]
        one = single[scope]
        aux_mean = (ranks[0]["aux"] + ranks[1]["aux"]) / 2
        same = torch.allclose(aux_mean, one["aux"], atol=1e-6) and all(
            torch.allclose(ranks[0]["grads"][n], one["grads"][n], atol=1e-6) for n in one["grads"])
        if scope == "micro_batch":
            assert not same  # the test can tell: per-rank f differs from the global batch's
            continue
        assert same, scope
        for name in one["counts"]:  # each rank's buffers hold the whole global batch's counts
            assert torch.equal(ranks[0]["counts"][name], one["counts"][name])
            assert torch.equal(ranks[1]["counts"][name], one["counts"][name])


@pytest.mark.parametrize("fields", [
    dict(balance_loss_scope="global_batch", aux_loss_alpha=0.1, device_aux_loss_alpha=0.05, aux_loss_num_devices=2),
    dict(comm_balance_alpha=0.1, scoring_func="softmax", topk_method="group_limited_greedy"),
])
def test_scope_and_communication_loss_survive_save_and_load(tmp_path, fields: dict) -> None:
    model = scoped_model("micro_batch", **fields)
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids, labels=ids).aux_loss
    update_router_biases(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert not any("balance_counts" in key for key in load_file(tmp_path / "model.safetensors"))  # step state only
    loaded = MoEForCausalLM.from_pretrained(tmp_path).train()
    for key, value in fields.items():
        assert getattr(loaded.config, key) == value
    torch.testing.assert_close(loaded(input_ids=ids, labels=ids).aux_loss, expected)
