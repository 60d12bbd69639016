"""torch.compile (Inductor, CPU) with hf_moe's default backends: training steps equal eager, and generate() with a
static cache and transformers' compiled decode step (fullgraph=True) gives the eager greedy tokens, MLA and GQA.
Compiling is slow on a small CPU: one-MoE-layer models, few tests, marked slow."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.generation.configuration_utils import CompileConfig

from hf_moe import MoEForCausalLM
from tests.conftest import tiny_config, tiny_gqa_config

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def randomized(model: MoEForCausalLM) -> MoEForCausalLM:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    return model


def test_compiled_training_steps_equal_eager() -> None:
    """torch.compile(model, fullgraph=True) on a training forward (group-limited sigmoid routing with the bias, bias
    counters, fused experts as hf_moe::fused_experts, shared expert): loss.backward and SGD steps match eager."""
    config = tiny_config(num_hidden_layers=1, first_k_dense_replace=0)
    eager = randomized(MoEForCausalLM(config)).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, compiled_model)]
    ids = torch.randint(3, 97, (2, 9))  # 18 tokens x 2 slots > 8 experts: the custom op, not the decode form
    for _ in range(3):
        losses = []
        for forward, optimizer in zip((eager, compiled), optimizers):
            loss = forward(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-4, atol=1e-5, msg=name)
    counts = [m.model.layers[0].mlp.gate.tokens_per_expert for m in (eager, compiled_model)]
    torch.testing.assert_close(counts[1], counts[0])  # the bias counters count in the compiled graph too
    assert counts[0].sum() == 3 * ids.numel() * config.num_experts_per_tok


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_static_cache_generate_compiles_the_decode_step_fullgraph(kind: str) -> None:
    """generate(cache_implementation="static") with transformers' compile of the decode step, fullgraph=True:
    gathered experts, routing, absorbed MLA over the static latent buffer, no graph break, no host sync."""
    config = tiny_config(num_hidden_layers=2) if kind == "mla" else tiny_gqa_config(num_hidden_layers=2)
    model = randomized(MoEForCausalLM(config)).eval()
    assert type(model)._can_compile_fullgraph
    ids = torch.randint(3, 97, (1, 5))
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless asked
    got = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0,
                         cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # the compiled decode step ran
    assert torch.equal(got, expected)
