"""Tiny models with known routing, synthetic traces and a small model folder with a tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_moe import MoEConfig, MoEForCausalLM
from hf_moe.analysis import RoutingTrace, TokenSequence

VOCAB, EXPERTS, TOP_K, HIDDEN = 32, 8, 2, 16
HALF = VOCAB // 2  # ids below HALF belong to domain 0, the others to domain 1


def hand_set_config(**overrides: object) -> MoEConfig:
    fields: dict = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, attention_type="gqa", n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
        moe_intermediate_size=8, n_shared_experts=1, first_k_dense_replace=0, max_position_embeddings=64,
        pad_token_id=0, scoring_func="sigmoid", router_bias_update_rate=0.0,
    )
    fields.update(overrides)
    return MoEConfig(**fields)


def expert_pair(token: int) -> tuple[int, int]:
    """The two experts the hand-set router sends `token` to: experts 0-3 for ids < HALF, 4-7 for the rest."""
    group, local = divmod(token, HALF)
    first = local % 4
    second = (first + 1 + (local // 4) % 3) % 4
    return 4 * group + first, 4 * group + second


def hand_set_model(**overrides: object) -> MoEForCausalLM:
    """Every layer's router sends token id v to `expert_pair(v)`, whatever its context: attention and every
    FFN write nothing (o_proj, down_proj = 0), so the residual stream stays the embedding, whose row v is
    e_a + e_b (a, b = expert_pair(v)) in the first EXPERTS dimensions, and each router's weight is 8 * identity
    there: logits 8/rms at a and b, 0 elsewhere."""
    model = MoEForCausalLM(hand_set_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj", "down_proj.weight")):
                param.zero_()
        embedding = torch.zeros(VOCAB, HIDDEN)
        for token in range(VOCAB):
            embedding[token, list(expert_pair(token))] = 1.0
        model.model.embed_tokens.weight.copy_(embedding)
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:, :EXPERTS] = 8 * torch.eye(EXPERTS)
    return model


def domain_sequences(count: int, length: int, seed: int = 0) -> list[TokenSequence]:
    """`count` random sequences per domain: domain 0 uses ids 0..HALF-1, domain 1 ids HALF..VOCAB-1."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for domain, low in ((0, 0), (1, HALF)):
        for _ in range(count):
            out.append(TokenSequence(domain, torch.randint(low, low + HALF, (length,), generator=generator)))
    return out


def random_trace(tokens: int = 4000, layers: int = 2, experts: int = EXPERTS, top_k: int = TOP_K, vocab: int = 50,
                 seq_len: int = 64, batch: int = 4, seed: int = 0) -> RoutingTrace:
    """A trace whose routing is uniformly random (K distinct experts per token), independent of everything."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(layers, tokens, experts, generator=g).argsort(dim=-1)[..., :top_k]
    positions = torch.arange(tokens) % seq_len
    sequences = torch.arange(tokens) // seq_len
    return RoutingTrace(
        layers=[f"layer_{i}" for i in range(layers)], num_experts=experts, top_k=top_k, domain_names=["a", "b"],
        token_ids=torch.randint(0, vocab, (tokens,), generator=g), positions=positions,
        domains=(torch.arange(tokens) >= tokens // 2).long(), sequences=sequences, batches=sequences // batch,
        topk_ids=ids, topk_weights=torch.ones(layers, tokens, top_k), entropy=torch.zeros(layers, tokens),
    )


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny tensors only here: one intra-op thread avoids OpenMP hand-offs, which cost up to 0.3 s per op on a
    machine whose cores are busy with other jobs (the root conftest sets 2 threads before this runs)."""
    torch.set_num_threads(1)


SAMPLE_CODE = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 20
SAMPLE_PROSE = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.\n" * 20


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny hf_moe model (MLA, sigmoid, group-limited routing) with a byte-level BPE tokenizer."""
    from hf_moe.demo.corpus import train_tokenizer

    from ..conftest import tiny_config

    root = tmp_path_factory.mktemp("analysis_model")
    (root / "code.txt").write_text(SAMPLE_CODE)
    (root / "prose.txt").write_text(SAMPLE_PROSE)
    tokenizer = train_tokenizer([root / "code.txt", root / "prose.txt"], vocab_size=300)
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config(vocab_size=len(tokenizer), num_hidden_layers=2))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root
