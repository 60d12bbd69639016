"""MoECallback with transformers.Trainer: one bias update per optimizer step, `moe/` logs, eval MaxVio, and
checkpoint resume giving the same biases and weights as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import DefaultFlowCallback, Trainer, TrainingArguments

from hf_moe import MoEForCausalLM
from hf_moe.training import MoECallback, expert_load, find_routers
from tests.conftest import tiny_config

GAMMA = 2.0**-8


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def dataset(rows: int = 32, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, 97, (rows, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def make_model(seed: int = 0, **overrides: object) -> MoEForCausalLM:
    torch.manual_seed(seed)
    fields = dict(router_bias_update_rate=GAMMA, num_nextn_predict_layers=1, aux_loss_alpha=0.01,
                  seq_aux_loss_alpha=1e-3)
    fields.update(overrides)
    return MoEForCausalLM(tiny_config(**fields))


def arguments(out: str, **overrides: object) -> TrainingArguments:
    fields = dict(output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=3,
                  learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                  dataloader_num_workers=0, lr_scheduler_type="constant")
    fields.update(overrides)
    return TrainingArguments(**fields)


def biases(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([router.e_score_correction_bias.detach().clone() for _, router in find_routers(model)])


def test_trainer_updates_biases_once_per_optimizer_step_and_logs_moe_metrics(tmp_path) -> None:
    model = make_model()
    callback = MoECallback()
    trainer = Trainer(model=model, args=arguments(str(tmp_path), per_device_train_batch_size=2,
                                                  gradient_accumulation_steps=2),
                      train_dataset=dataset(), callbacks=[callback])
    trainer.train()

    # one update per optimizer step, each over both micro-batches: 2 x 2 rows x 12 tokens x K=2 per layer
    assert [entry["step"] for entry in callback.history] == [1, 2, 3]
    assert callback.last_loads.loads.sum(dim=-1).tolist() == [96.0, 96.0, 88.0]  # MTP: 1 position less per row
    steps = biases(model) / GAMMA  # each step moves each bias by +-gamma or 0
    assert torch.equal(steps, steps.round()) and steps.abs().max() <= 3 and steps.abs().sum() > 0

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry, step in zip(logs, callback.history):
        for key in ("moe/max_vio", "moe/max_vio/layer_1", "moe/max_vio/layer_2", "moe/max_vio/mtp_0",
                    "moe/aux_loss", "moe/mtp_loss", "moe/lm_loss"):
            assert key in entry, key
        assert entry["moe/max_vio"] == pytest.approx((step["max_vio"][0] + step["max_vio"][1]) / 2)
        # the Trainer's loss is LM + MTP + aux: the captured parts add up to it
        parts = entry["moe/lm_loss"] + entry["moe/mtp_loss"] + entry["moe/aux_loss"]
        assert parts == pytest.approx(entry["loss"], rel=1e-4)
        assert 0 < entry["moe/aux_loss"] < entry["moe/mtp_loss"] < entry["moe/lm_loss"]


def test_trainer_accumulation_and_checkpointing_give_the_biases_of_one_batch(tmp_path) -> None:
    """Without aux losses (which are per-micro-batch statistics, so not additive over micro-batches) the
    accumulated steps are the one-batch steps, and the biases are identical."""
    results = []
    for batch, accumulation, checkpointing in ((4, 1, False), (2, 2, False), (1, 4, False), (2, 2, True)):
        model = make_model(aux_loss_alpha=0.0, seq_aux_loss_alpha=0.0)
        Trainer(model=model, args=arguments(str(tmp_path / f"{batch}-{checkpointing}"),
                                            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                            activation_checkpointing=checkpointing),
                train_dataset=dataset(), callbacks=[MoECallback()]).train()
        assert model.model.layers[1].gradient_checkpointing == checkpointing
        results.append(biases(model))
    assert all(torch.equal(results[0], other) for other in results[1:])
    assert results[0].abs().sum() > 0


def test_evaluation_logs_the_global_max_vio_of_the_eval_set(tmp_path) -> None:
    model = make_model()
    eval_set = dataset(rows=8, seed=1)
    trainer = Trainer(model=model, args=arguments(str(tmp_path), per_device_eval_batch_size=4, max_steps=1),
                      train_dataset=dataset(), eval_dataset=eval_set, callbacks=[MoECallback()])
    trainer.train()
    metrics_log = trainer.state.log_history
    trainer.evaluate()
    eval_entry = metrics_log[-1]
    assert "eval_loss" in eval_entry and "moe/eval_max_vio" in eval_entry
    batches = [{"input_ids": torch.stack([row["input_ids"] for row in eval_set[i:i + 4]])} for i in (0, 4)]
    expected = expert_load(model, batches)
    assert eval_entry["moe/eval_max_vio"] == pytest.approx(expected.mean_max_vio(), rel=1e-6)
    assert eval_entry["moe/eval_max_vio/layer_1"] == pytest.approx(expected.max_vio[0].item(), rel=1e-6)
    assert eval_entry["moe/eval_max_vio/mtp_0"] >= 0  # MTP blocks run in evaluation (labels given)
    assert sum(router.tokens_per_expert.sum() for _, router in find_routers(model)) == 0  # eval never counts


def test_resume_from_checkpoint_gives_the_biases_and_weights_of_an_uninterrupted_run(tmp_path) -> None:
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2, lr_scheduler_type="linear",
                per_device_train_batch_size=2, gradient_accumulation_steps=2)
    uninterrupted = make_model()
    Trainer(model=uninterrupted, args=arguments(str(tmp_path / "a"), **args), train_dataset=dataset(),
            callbacks=[MoECallback()]).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = load_file(str(checkpoint / "model.safetensors"))
    saved_bias = saved["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert saved_bias.dtype == torch.float32 and saved_bias.abs().sum() > 0  # the bias state travels with the model

    resumed = make_model(seed=123)  # different initial weights: everything must come from the checkpoint
    Trainer(model=resumed, args=arguments(str(tmp_path / "b"), **args), train_dataset=dataset(),
            callbacks=[MoECallback()]).train(resume_from_checkpoint=str(checkpoint))

    assert torch.equal(biases(resumed), biases(uninterrupted))
    assert not torch.equal(biases(resumed)[0], saved_bias)  # and kept updating after the resume
    final = resumed.state_dict()
    for name, tensor in uninterrupted.state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0, msg=name)


def test_attach_puts_the_callback_ahead_of_reporting_integrations(tmp_path) -> None:
    trainer = Trainer(model=make_model(), args=arguments(str(tmp_path)), train_dataset=dataset())
    callback = MoECallback.attach(trainer)
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], DefaultFlowCallback) and callbacks[1] is callback
    trainer.train()
    assert "moe/max_vio" in trainer.state.log_history[0]


def test_trainer_logs_dead_experts_routing_entropy_and_load_percentiles(tmp_path) -> None:
    import math

    from hf_moe.training import dead_experts, load_percentiles, routing_entropy

    model = make_model(num_nextn_predict_layers=0)
    callback = MoECallback()
    entropies = []  # what the routers' training forwards saw, computed independently
    handles = [router.register_forward_hook(
        lambda m, a, o: entropies.append(routing_entropy(o.logits.detach().sigmoid()).mean().item()) if m.training
        else None) for _, router in find_routers(model)]
    trainer = Trainer(model=model, args=arguments(str(tmp_path), max_steps=2), train_dataset=dataset(),
                      callbacks=[callback])
    trainer.train()
    for handle in handles:
        handle.remove()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    loads = callback.last_loads.loads
    last = logs[-1]
    assert last["moe/dead_experts"] == pytest.approx(dead_experts(loads).mean().item())
    for layer, label in enumerate(("layer_1", "layer_2")):
        assert last[f"moe/dead_experts/{label}"] == pytest.approx(dead_experts(loads[layer]).item())
        expected = load_percentiles(loads[layer]).tolist()
        got = [last[f"moe/load_p{q}/{label}"] for q in (0, 10, 50, 90, 100)]
        assert got == pytest.approx(expected) and got == sorted(got)
    # the mean entropy over the step's tokens of each layer, then over layers (one forward per step here)
    assert last["moe/routing_entropy"] == pytest.approx((entropies[-2] + entropies[-1]) / 2, rel=1e-5)
    assert 0 < last["moe/routing_entropy"] <= math.log(8)
