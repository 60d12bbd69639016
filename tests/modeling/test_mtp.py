"""Multi-token prediction: the training loss by hand, gradients, a short run, zero cost at inference, and
self-speculative greedy decoding that reproduces `generate()`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_moe import MoEForCausalLM
from tests.conftest import tiny_config, tiny_gqa_config


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def mtp_model(depth: int = 2, **overrides: object) -> MoEForCausalLM:
    model = MoEForCausalLM(tiny_config(num_nextn_predict_layers=depth, mtp_loss_weight=0.3, **overrides))
    with torch.no_grad():  # distinct norm weights, so swapping the embedding and hidden halves would show
        for module in model.mtp:
            module.enorm.weight.uniform_(0.5, 1.5)
            module.hnorm.weight.uniform_(0.5, 1.5)
            module.norm.weight.uniform_(0.5, 1.5)
    return model


def counting_run(length: int, batch: int = 16, seed: int = 0) -> torch.Tensor:
    """Sequences t, t+1, t+2, ... (mod 94, ids 3..96): every next token follows from the current one."""
    start = torch.randint(3, 97, (batch, 1), generator=torch.Generator().manual_seed(seed))
    return (start - 3 + torch.arange(length)) % 94 + 3


@pytest.fixture(scope="module")
def trained() -> MoEForCausalLM:
    """A tiny model with 2 MTP modules trained for 30 steps on counting runs (all losses recorded)."""
    torch.manual_seed(0)
    model = mtp_model(depth=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model.history = []
    for step in range(30):
        ids = counting_run(24, seed=step)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.history.append((out.lm_loss.item(), out.mtp_loss.item()))
    return model.eval()


def test_mtp_loss_equals_a_hand_computation_with_labels_shifted_by_k_plus_1() -> None:
    """Depth k at position i: h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) -> block -> norm -> head,
    scored against labels[i + k + 1]; -100 and attention_mask == 0 are never targets (DeepSeek-V3 eqs. 21-25)."""
    model = mtp_model(depth=2).eval()
    ids = torch.randint(3, 97, (2, 8))
    labels = ids.clone()
    labels[0, 5] = -100
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: tokens 6, 7 of row 1
    out = model(input_ids=ids, attention_mask=mask, labels=labels)

    base = model.model
    embeds = base.embed_tokens(ids)
    positions = torch.arange(8).unsqueeze(0)
    causal = base.attention_mask_for(embeds, mask, None, positions)
    rope = base.rotary_emb(embeds, positions)
    previous = base(input_ids=ids, attention_mask=mask).last_hidden_state  # h^0
    total = 0.0
    for k, module in enumerate(model.mtp, start=1):
        future = torch.zeros_like(embeds)
        future[:, : 8 - k] = embeds[:, k:]  # Emb(t_{i+k})
        merged = module.eh_proj(torch.cat((module.enorm(future), module.hnorm(previous)), dim=-1))
        previous, _, _ = module.block(merged, attention_mask=causal, position_embeddings=rope)
        log_probs = F.log_softmax(model.lm_head(module.norm(previous)).float(), dim=-1)
        terms = [-log_probs[b, i, labels[b, i + k + 1]]
                 for b in range(2) for i in range(8 - k - 1)
                 if labels[b, i + k + 1] != -100 and mask[b, i + k + 1] == 1]
        assert len(terms) == {1: 2 * 6 - 1 - 2, 2: 2 * 5 - 1 - 2}[k]
        total = total + torch.stack(terms).mean()
    torch.testing.assert_close(out.mtp_loss, 0.3 / 2 * total, rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_mtp_part() -> None:
    model = mtp_model(depth=2).train()
    ids = torch.randint(3, 97, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    for k, module in enumerate(model.mtp):
        for part in ("enorm", "hnorm", "eh_proj", "norm", "block.self_attn", "block.mlp.gate", "block.mlp.experts",
                     "block.mlp.shared_experts"):
            grads = [p.grad for p in module.get_submodule(part).parameters()]
            assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, (k, part)


def test_mtp_loss_is_finite_and_decreases_in_a_short_run(trained: MoEForCausalLM) -> None:
    lm, mtp = zip(*trained.history)
    assert all(torch.isfinite(torch.tensor(lm + mtp)))
    assert mtp[-1] < 0.2 * mtp[0] and lm[-1] < 0.2 * lm[0]


def test_mtp_modules_cost_nothing_at_inference() -> None:
    model = mtp_model(depth=2).eval()
    calls = []
    for module in model.mtp:
        module.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        model(input_ids=ids)
    model.generate(ids, max_new_tokens=4, do_sample=False)
    assert calls == []
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    assert len(calls) == 2


def reference_drafts(model: MoEForCausalLM, tokens: torch.Tensor, depth: int) -> torch.Tensor:
    """Drafts for t_L.. recomputed from scratch (no cache) from the L accepted tokens, as in training."""
    length = tokens.shape[1]
    base = model.model
    positions = torch.arange(length - 1).unsqueeze(0)
    previous = base(input_ids=tokens[:, :-1]).last_hidden_state  # h^0 at positions 0..L-2
    known, drafts = tokens, []
    for k in range(1, depth + 1):
        module = model.mtp[k - 1]
        embeds = base.embed_tokens(known[:, k:length - 1 + k])
        causal = base.attention_mask_for(embeds, None, None, positions)
        previous, _ = module(previous, embeds, causal, base.rotary_emb(embeds, positions))
        drafts.append(model.lm_head(module.norm(previous[:, -1])).argmax(dim=-1, keepdim=True))
        known = torch.cat((known, drafts[-1]), dim=1)
    return torch.cat(drafts, dim=1)


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_greedy_equals_generate_and_drafts_match_a_full_recompute(
    trained: MoEForCausalLM, depth: int
) -> None:
    random_model = mtp_model(depth=2).eval()
    for model, prompt in ((trained, counting_run(5, batch=1, seed=99)), (random_model, torch.randint(3, 97, (1, 5)))):
        # break the counting pattern once, so that some drafts are rejected
        prompt = torch.cat((prompt, torch.tensor([[50]])), dim=1)
        reference = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        result = model.generate_with_mtp(prompt, max_new_tokens=16, num_draft_tokens=depth, eos_token_id=[])
        assert torch.equal(result.sequences, reference)
        assert result.new_tokens == 16 and result.drafted > 0
        for length, drafts in result.rounds:
            if drafts.shape[1] == 0:  # the last round may have no budget left to draft
                continue
            expected = reference_drafts(model, result.sequences[:, :length], drafts.shape[1])
            assert torch.equal(drafts, expected), length
    # the counting model drafts well: most drafts accepted, several tokens per main forward
    assert result.acceptance_rate < 0.5  # (random model)
    trained_result = trained.generate_with_mtp(counting_run(6, batch=1, seed=7), max_new_tokens=24,
                                               num_draft_tokens=depth, eos_token_id=[])
    assert trained_result.acceptance_rate > 0.9
    assert trained_result.tokens_per_forward > 1 + 0.8 * depth


@pytest.mark.parametrize("config", [
    tiny_gqa_config(num_nextn_predict_layers=3),
    tiny_gqa_config(num_nextn_predict_layers=2, sliding_window=4, n_shared_experts=0, first_k_dense_replace=0),
], ids=["gqa-depth3", "gqa-sliding-window"])
def test_speculative_greedy_equals_generate_for_other_attention(config: object) -> None:
    model = MoEForCausalLM(config).eval()
    prompt = torch.randint(3, 97, (2, 9))
    reference = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    result = model.generate_with_mtp(prompt, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(result.sequences, reference)
    for length, drafts in result.rounds[:-1]:
        assert torch.equal(drafts, reference_drafts(model, result.sequences[:, :length], drafts.shape[1]))


def test_speculative_batch_with_left_padding_and_eos_equals_generate(trained: MoEForCausalLM) -> None:
    prompt = counting_run(7, batch=3, seed=3)
    prompt[1, 4] = 60  # breaks the pattern in one row
    mask = torch.ones_like(prompt)
    mask[2, :3] = 0  # left padding
    prompt[2, :3] = 0
    plain = trained.generate(prompt, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    # end-of-sequence tokens that the rows generate at steps 10, 6 and 14: rows finish at different rounds, then
    # are padded, and decoding stops once all are done; both decoders must agree on all of it
    eos = [int(plain[0, 7 + 9]), int(plain[1, 7 + 5]), int(plain[2, 7 + 13])]
    reference = trained.generate(prompt, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0)
    assert reference.shape[1] < plain.shape[1] and (reference[:, -1] == 0).sum() == 2
    for depth in (0, 1, 2):
        result = trained.generate_with_mtp(prompt, attention_mask=mask, max_new_tokens=20, num_draft_tokens=depth,
                                           eos_token_id=eos, pad_token_id=0)
        assert torch.equal(result.sequences, reference), depth


def test_generate_with_mtp_needs_mtp_modules() -> None:
    model = MoEForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        model.generate_with_mtp(torch.randint(3, 97, (1, 4)))


@pytest.mark.parametrize("layer_types", [
    ["sliding_attention", "full_attention", "sliding_attention"],
    ["chunked_attention", "sliding_attention", "full_attention"],
], ids=["sliding-full", "chunked-sliding-full"])
def test_speculative_greedy_with_mixed_layer_types_equals_generate(layer_types: list[str]) -> None:
    """Per-layer `layer_types`: the MTP block (a full-attention layer past the last one) gets the mask MoEModel
    builds for its type, so its drafts equal a full recompute and the tokens equal generate()'s; sliding and
    chunked cache layers are cropped after rejected drafts."""
    config = tiny_gqa_config(num_nextn_predict_layers=1, sliding_window=3, attention_chunk_size=4,
                             n_shared_experts=0, layer_types=layer_types)
    assert config.layer_type(config.num_hidden_layers) == "full_attention"  # the MTP block
    model = MoEForCausalLM(config).eval()
    prompt = torch.randint(3, 97, (2, 9))
    reference = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    result = model.generate_with_mtp(prompt, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(result.sequences, reference)
    assert result.drafted > 0
    for length, drafts in result.rounds[:-1]:
        assert torch.equal(drafts, reference_drafts(model, result.sequences[:, :length], drafts.shape[1])), length
