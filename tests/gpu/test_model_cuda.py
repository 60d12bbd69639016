"""The whole model on CUDA: bf16 close to fp32, equal to transformers' DeepseekV3ForCausalLM with the same
weights (fp32 within 1e-4; bf16 no less accurate than transformers' bf16), absorbed MLA decode through
generate() (with cache == without, absorbed == expanded), and training steps (plain loop with
`update_router_biases`, Trainer with bf16 autocast and `MoECallback`)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DeepseekV3ForCausalLM, Trainer, TrainingArguments

from hf_moe import MoEForCausalLM
from hf_moe.conversion.families import config_from_moe, state_dict_from_moe
from hf_moe.training import MoECallback, find_routers, update_router_biases
from tests.gpu.conftest import DEVICE, HAS_CUDA, cuda_config, gpu, relative_error, row_errors

pytestmark = gpu

FP32_TOL = 1e-4  # fp32 on CUDA, TF32 off: two implementations of one model, reductions in other orders
# bf16 logits: a 3-layer model rounds at ~20 places on the way (unit roundoff u = 2^-8 each); the per-token
# error of the logits against fp32 is about 2u (median 7e-3, 90th percentile 1e-2 on CPU). A token whose top-k
# experts flip under bf16 rounding (scores within ~u of each other) is off by far more (0.1), so the checks
# read the median token, and the 90th percentile within a looser bound, not the worst one.
BF16_MEDIAN, BF16_P90 = 2e-2, 4e-2


def make_model(**overrides: object) -> MoEForCausalLM:
    """An fp32 model with a non-zero balancing bias (routing differences would show)."""
    model = MoEForCausalLM(cuda_config(**overrides))
    with torch.no_grad():
        for _, router in find_routers(model):
            router.e_score_correction_bias.normal_(0, 0.01)
    return model


def transformers_copy(model: MoEForCausalLM) -> DeepseekV3ForCausalLM:
    """transformers' DeepSeek-V3 with exactly our weights (hf_moe.conversion's mapping, as the benchmark)."""
    config = config_from_moe(model.config, "deepseek_v3")
    config._attn_implementation = model.config._attn_implementation
    theirs = DeepseekV3ForCausalLM(config)
    state = state_dict_from_moe("deepseek_v3", {k: v.cpu() for k, v in model.state_dict().items()}, model.config)
    theirs.load_state_dict(state, strict=True)
    return theirs.to(DEVICE)


def random_ids(batch: int = 4, length: int = 64) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), device=DEVICE)


def quantiles(errors: torch.Tensor) -> tuple[float, float]:
    return errors.median().item(), errors.quantile(0.9).item()


# ------------------------------------------------------------------------------------------------ precision
def test_bf16_model_close_to_fp32() -> None:
    """Same weights, bf16 vs fp32: logits per token (median, 90th percentile) and the training loss."""
    model = make_model().to(DEVICE).eval()
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32  # kept fp32
    ids = random_ids()
    with torch.no_grad():
        reference, logits = model(ids).logits, half(ids).logits
        loss, half_loss = model(ids, labels=ids).loss, half(ids, labels=ids).loss
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    median, p90 = quantiles(row_errors(logits, reference))
    assert median < BF16_MEDIAN and p90 < BF16_P90, f"bf16 vs fp32 logits: median {median:.2e}, p90 {p90:.2e}"
    assert relative_error(half_loss, loss) < 1e-2, (half_loss.item(), loss.item())


@pytest.mark.parametrize("implementation", ["hf_moe_auto", "hf_moe_fused", "hf_moe_triton"])
def test_fp32_matches_transformers(implementation: str) -> None:
    """fp32, our experts backend vs transformers' eager experts: logits, loss, and gradients of the embedding,
    the head and the first MoE layer's router (the same tensors in both models)."""
    if implementation == "hf_moe_triton" and not HAS_CUDA:
        pytest.skip("hf_moe_triton compiles for CUDA")
    ours = make_model()
    theirs = transformers_copy(ours)
    ours.to(DEVICE).train()
    theirs.train()
    ours.set_experts_implementation(implementation)
    theirs.set_experts_implementation("eager")
    ids = random_ids()
    out_ours, out_theirs = ours(ids, labels=ids), theirs(ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=FP32_TOL, atol=FP32_TOL)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=FP32_TOL, atol=FP32_TOL)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        got, want = ours.get_parameter(name).grad, theirs.get_parameter(name).grad
        error = relative_error(got, want)
        assert error < FP32_TOL, f"{name} gradient: relative error {error:.2e}"


def test_bf16_matches_transformers_bf16() -> None:
    """bf16, both with their default GPU experts path (ours hf_moe_auto, theirs grouped_mm), both measured
    against transformers in fp32 on the same bf16-rounded weights: ours no less accurate than theirs."""
    ours = make_model()
    theirs = transformers_copy(ours).to(torch.bfloat16)
    truth = copy.deepcopy(theirs).float().eval()  # bf16-rounded weights, fp32 arithmetic
    ours.to(device=DEVICE, dtype=torch.bfloat16).eval()
    theirs.eval().set_experts_implementation("grouped_mm")
    truth.set_experts_implementation("eager")
    ids = random_ids()
    with torch.no_grad():
        want = truth(ids).logits
        errors_ours = row_errors(ours(ids).logits, want)
        errors_theirs = row_errors(theirs(ids).logits, want)
    (median, p90), (their_median, their_p90) = quantiles(errors_ours), quantiles(errors_theirs)
    assert median < min(1.5 * their_median + 2e-3, BF16_MEDIAN), f"median {median:.2e}, theirs {their_median:.2e}"
    assert p90 < BF16_P90, f"90th percentile {p90:.2e}, theirs {their_p90:.2e}"


# ------------------------------------------------------------------------------------------------ decode
def set_absorb(model: MoEForCausalLM, flag: bool) -> None:
    for layer in model.model.layers:
        layer.self_attn.absorb = flag


@pytest.fixture
def absorbed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts absorbed attention calls (the attention class is taken from a model, not from a module path)."""
    calls: list[int] = []
    attention = type(MoEForCausalLM(cuda_config(num_hidden_layers=1)).model.layers[0].self_attn)
    original = attention.absorbed_attention

    def spy(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attention, "absorbed_attention", spy)
    return calls


def greedy(model: MoEForCausalLM, ids: torch.Tensor, mask: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def left_padded(batch: int = 3, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(batch, length)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_absorbed_decode_equals_no_cache_and_expanded(cache_implementation: str | None, absorbed_calls: list) -> None:
    """fp32 greedy decoding, batch 3 with left padding: the cached absorbed path (our default) gives the tokens
    of a full recompute without cache, and the tokens and logits of the expanded (non-absorbed) cached path.
    With a static cache, transformers would compile the decode step on CUDA: that is switched off here
    (`disable_compile`), so these are the eager paths (the spy would count traces, not calls, under compile)."""
    model = make_model().to(DEVICE).eval()
    ids, mask = left_padded()
    kwargs = {"cache_implementation": cache_implementation, "disable_compile": True} if cache_implementation else {}
    no_cache_tokens, no_cache_logits = greedy(model, ids, mask, use_cache=False)
    assert absorbed_calls == []
    set_absorb(model, False)
    expanded_tokens, expanded_logits = greedy(model, ids, mask, **kwargs)
    assert absorbed_calls == []
    set_absorb(model, True)
    tokens, logits = greedy(model, ids, mask, **kwargs)
    assert len(absorbed_calls) == 11 * 3  # 11 decode steps x 3 layers; the prefill stays expanded
    assert torch.equal(tokens, no_cache_tokens) and torch.equal(tokens, expanded_tokens)
    torch.testing.assert_close(logits, expanded_logits, rtol=FP32_TOL, atol=FP32_TOL)
    torch.testing.assert_close(logits, no_cache_logits, rtol=FP32_TOL, atol=FP32_TOL)


def test_bf16_absorbed_decode_step_close_to_expanded(absorbed_calls: list) -> None:
    """bf16: one decode step on a 40-token cache, absorbed vs expanded, both against the fp32 model's step."""
    model = make_model().to(DEVICE).eval()
    half = copy.deepcopy(model).to(torch.bfloat16)
    ids = random_ids(4, 41)
    results = {}
    with torch.no_grad():
        for name, net, absorb in (("fp32", model, True), ("absorbed", half, True), ("expanded", half, False)):
            set_absorb(net, absorb)
            out = net(ids[:, :40], use_cache=True)
            results[name] = net(ids[:, 40:], cache=out.past_key_values, use_cache=True).logits[:, -1]
    assert len(absorbed_calls) == 2 * 3  # the fp32 and the absorbed bf16 step
    absorbed, expanded = row_errors(results["absorbed"], results["fp32"]), row_errors(results["expanded"], results["fp32"])
    assert absorbed.median() < min(1.5 * expanded.median().item() + 2e-3, BF16_MEDIAN), (absorbed, expanded)


# ------------------------------------------------------------------------------------------------ training
def test_training_loop_bf16_with_router_bias_updates() -> None:
    """bf16 weights, AdamW on one fixed batch, `update_router_biases` after each step: the loss is finite and
    falls, every gradient is finite, the biases move by +-gamma steps and the counters restart at zero."""
    gamma = 2.0**-8
    model = make_model(router_bias_update_rate=gamma).to(device=DEVICE, dtype=torch.bfloat16).train()
    with torch.no_grad():
        for _, router in find_routers(model):
            router.e_score_correction_bias.zero_()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = random_ids(4, 128)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loads = update_router_biases(model)
        assert loads.loads.sum(dim=-1).eq(4 * 128 * model.config.num_experts_per_tok).all()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.9 * losses[0], losses
    for _, router in find_routers(model):
        steps = router.e_score_correction_bias / gamma
        assert steps.abs().sum() > 0 and torch.equal(steps, steps.round()) and steps.abs().max() <= 8
        assert router.tokens_per_expert.sum() == 0


def test_trainer_bf16_autocast_with_moe_callback(tmp_path: object) -> None:
    """transformers.Trainer, fp32 weights under bf16 autocast (`bf16=True`), with MoECallback: three optimizer
    steps, finite losses, one bias update per step."""
    gamma = 2.0**-8
    model = make_model(router_bias_update_rate=gamma)
    with torch.no_grad():
        for _, router in find_routers(model):
            router.e_score_correction_bias.zero_()
    rows = torch.randint(3, 512, (24, 32))
    data = [{"input_ids": row, "labels": row.clone()} for row in rows]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=not HAS_CUDA, bf16=True, report_to=[],
                             per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    callback = MoECallback()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert next(model.parameters()).device.type == DEVICE.type
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), trainer.state.log_history
    assert [entry["step"] for entry in callback.history] == [1, 2, 3]
    for _, router in find_routers(model):
        steps = router.e_score_correction_bias / gamma
        assert steps.abs().sum() > 0 and torch.equal(steps, steps.round()) and steps.abs().max() <= 3
