"""torch.export of MoEForCausalLM for inference: the exported program's logits equal eager, MLA and GQA, for a
prompt (the experts as the hf_moe::fused_experts op) and a single token (the gathered decode form); and
transformers' own exporter (caches as pytree nodes, dynamic sequence length)."""

from __future__ import annotations

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.modeling.routing import RouterOutput
from tests.conftest import tiny_config, tiny_gqa_config

CONFIGS = {"mla": lambda: tiny_config(num_hidden_layers=2), "gqa": lambda: tiny_gqa_config(num_hidden_layers=2)}


def build(kind: str) -> MoEForCausalLM:
    model = MoEForCausalLM(CONFIGS[kind]()).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    return model


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("length", [1, 9])
def test_exported_program_logits_equal_eager(kind: str, length: int) -> None:
    model = build(kind)
    ids = torch.randint(3, 97, (2, length))
    program = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    if length > 1:  # 18 tokens x 2 slots > 8 experts: the opaque fused op is in the graph
        assert "hf_moe.fused_experts" in str(program.graph)
    out = program.module()(ids, use_cache=False)
    expected = model(ids, use_cache=False)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert all(isinstance(r, RouterOutput) for r in out.routings)  # a pytree node, rebuilt on the way out
    assert torch.equal(out.routings[-1].topk_ids, expected.routings[-1].topk_ids)


def test_transformers_exporter_with_cache_and_dynamic_length() -> None:
    from transformers.exporters.exporter_dynamo import DynamoConfig, DynamoExporter

    model = build("mla")
    exported = DynamoExporter().export(model, {"input_ids": torch.randint(3, 97, (2, 7))},
                                       config=DynamoConfig(dynamic=True))
    for length in (7, 12):
        ids = torch.randint(3, 97, (2, length))
        out = exported(input_ids=ids)
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        assert out.cache is not None
