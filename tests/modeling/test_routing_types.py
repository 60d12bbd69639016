"""Router types other than the learned router (hash, expert choice, balanced assignment) and routing replay:
hand-computed tiny examples, gradient flow, save/load round trips, and short training runs showing what each
promises (hash: context-independent routing; expert choice / BASE: balanced loads by construction)."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_moe import MoEConfig, MoEForCausalLM
from hf_moe.modeling.configuration import ConfigFieldError
from hf_moe.modeling.router_types import (
    BalancedAssignmentRouter,
    ExpertChoiceRouter,
    HashRouter,
    balanced_assignment,
    balanced_hash_table,
    expert_choice_capacity,
)
from hf_moe.modeling.routing_inputs import NOT_RECORDED, RoutingInputs, RoutingRecorder
from hf_moe.training import find_routers, update_router_biases
from tests.conftest import tiny_config

FLAT = dict(n_group=1, topk_group=1, topk_method="greedy")  # the other router types have no groups


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def model_of(router_type: str, seed: int = 0, **overrides: object) -> MoEForCausalLM:
    torch.manual_seed(seed)
    fields = dict(FLAT, router_type=router_type, router_bias_update_rate=0.0)
    fields.update(overrides)
    return MoEForCausalLM(tiny_config(**fields))


def train(model: MoEForCausalLM, steps: int = 8, batch: int = 4, length: int = 12, seed: int = 0) -> list[torch.Tensor]:
    """A few AdamW steps on random tokens; returns the training step's loads (L, N) after each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    update_router_biases(model, rate=0.0)  # counts of earlier forwards must not show in the first step
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loads = []
    for _ in range(steps):
        ids = torch.randint(3, 97, (batch, length), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loads.append(update_router_biases(model).loads)
    return loads


def router_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [router.weight.grad for _, router in find_routers(model)]


# ------------------------------------------------------------------------------------------------- hash
def test_balanced_hash_table_by_hand() -> None:
    table = balanced_hash_table(10, 4, 2, seed=3)
    assert table.shape == (10, 2) and table.dtype == torch.long
    assert all((row[0] != row[1]).item() for row in table)  # a token's K experts differ
    for column in table.t():
        assert sorted(torch.bincount(column, minlength=4).tolist()) == [2, 2, 3, 3]  # floor/ceil(10 / 4) each
    assert torch.equal(table, balanced_hash_table(10, 4, 2, seed=3))  # seeded: the same table
    # by frequency (Roller et al.'s balanced assignment), most frequent first to the least loaded expert:
    # 5 -> e0 (5, 0); 3 -> e1 (5, 3); 2 -> e1 (5, 5); 1 -> e0 (tie, lower id first)
    by_count = balanced_hash_table(4, 2, 1, token_counts=torch.tensor([5.0, 3.0, 2.0, 1.0]))
    assert by_count[:, 0].tolist() == [0, 1, 1, 0]


def test_hash_router_routes_by_table_with_learned_gates() -> None:
    config = tiny_config(**FLAT, router_type="hash", hidden_size=4, n_routed_experts=4, num_experts_per_tok=2,
                         vocab_size=5, scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.0)
    router = HashRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
        router.hash_table.copy_(torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]]))
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0]])
    out = router(x, routing_inputs=RoutingInputs(token_ids=torch.tensor([4, 1])))
    assert out.topk_ids.tolist() == [[0, 2], [1, 2]]  # the table, whatever the scores say
    s = torch.sigmoid(x[0])
    expected = torch.stack([s[[0, 2]] / s[[0, 2]].sum(), s[[1, 2]] / s[[1, 2]].sum()])
    torch.testing.assert_close(out.topk_weights, expected)
    with pytest.raises(ValueError, match="routes by token id"):
        router(x)


def test_hash_routing_is_context_independent_before_and_after_training() -> None:
    model = model_of("hash")
    table = {name: router.hash_table.clone() for name, router in find_routers(model)}
    before = [router.weight.detach().clone() for _, router in find_routers(model)]
    train(model, steps=6)
    assert any(not torch.equal(b, r.weight) for b, (_, r) in zip(before, find_routers(model)))  # gates learn
    ids = torch.randint(3, 97, (6, 16), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        routings = model(input_ids=ids).routings
    for (name, router), routing in zip(find_routers(model), routings):
        assert torch.equal(router.hash_table, table[name])  # training never moves the table
        chosen = routing.topk_ids.view(6, 16, -1)
        # every occurrence of a token id, in any context and position, goes to the same experts: its table row
        assert torch.equal(chosen, router.hash_table[ids])


def test_hash_gradient_reaches_the_router_and_the_bias_is_left_alone() -> None:
    model = model_of("hash", router_bias_update_rate=1e-2)
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads(model))  # K=2 gates from the scores
    update_router_biases(model)
    assert all(r.e_score_correction_bias.abs().sum() == 0 for _, r in find_routers(model))  # bias steers nothing


def test_hash_needs_token_ids_and_takes_them_with_embeddings() -> None:
    model = model_of("hash").eval()
    ids = torch.randint(3, 97, (1, 6))
    embeds = model.model.embed_tokens(ids)
    with pytest.raises(ValueError, match="routes by token id"):
        model.model(inputs_embeds=embeds)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds, router_token_ids=ids).logits,
                                   model(input_ids=ids).logits)


def test_hash_table_survives_save_and_load(tmp_path) -> None:
    model = model_of("hash", seed=1)
    counts = torch.arange(97, dtype=torch.float32).flip(0)
    for _, router in find_routers(model):
        router.rebalance(counts)
    model.save_pretrained(tmp_path)
    loaded = MoEForCausalLM.from_pretrained(tmp_path)
    for (_, a), (_, b) in zip(find_routers(model), find_routers(loaded)):
        assert isinstance(b, HashRouter) and torch.equal(a.hash_table, b.hash_table)
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------- expert choice
def test_expert_choice_by_hand() -> None:
    config = tiny_config(**FLAT, router_type="expert_choice", hidden_size=2, n_routed_experts=2,
                         num_experts_per_tok=1, scoring_func="softmax", expert_choice_capacity_factor=1.0,
                         routed_scaling_factor=1.0)
    router = ExpertChoiceRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    x = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # softmax favours expert 0 for 3 tokens
    assert expert_choice_capacity(4, 2, 1.0) == 2  # C = ceil(1.0 * 4 / 2)
    out = router(x)
    s = x.softmax(dim=-1)
    # expert 0 takes tokens 0, 1 (its two highest scores); expert 1 takes tokens 3, 2
    taken = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    assert out.topk_ids.tolist() == [[0, 1]] * 4
    torch.testing.assert_close(out.topk_weights, s * taken)
    # padding (token 0 masked) takes no place: expert 0 then takes tokens 1 and 2
    masked = router(x, token_mask=torch.tensor([False, True, True, True]))
    assert (masked.topk_weights[:, 0] > 0).tolist() == [False, True, True, False]


def test_expert_choice_balances_by_construction_and_trains() -> None:
    model = model_of("expert_choice", scoring_func="softmax", norm_topk_prob=False, expert_choice_capacity_factor=2.0)
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads(model))
    for loads in train(model, steps=4, batch=4, length=12):  # 48 tokens, C = ceil(2 * 48 / 8) = 12 each
        assert torch.equal(loads, torch.full_like(loads, 12.0))


def test_expert_choice_leaks_the_future_and_refuses_generation(tmp_path) -> None:
    model = model_of("expert_choice", scoring_func="softmax", norm_topk_prob=False).eval()
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 3) % 94 + 3
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    # the documented leak: earlier positions see the last token through the experts' choice of tokens
    assert not torch.allclose(a[0, :-1], b[0, :-1])
    with pytest.raises(ValueError, match="generate\\(\\) is refused"):
        model.generate(ids, max_new_tokens=2)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :6], use_cache=True).cache
        with pytest.raises(ValueError, match="cannot decode token by token"):
            model(input_ids=ids[:, 6:7], cache=cache, use_cache=True)
    model.save_pretrained(tmp_path)
    loaded = MoEForCausalLM.from_pretrained(tmp_path).eval()
    assert all(isinstance(r, ExpertChoiceRouter) for _, r in find_routers(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, a)


# ----------------------------------------------------------------------------------------- balanced assignment
def test_balanced_assignment_by_hand_matches_the_best_balanced_assignment() -> None:
    scores = torch.tensor([[0.9, 0.8], [0.8, 0.1], [0.7, 0.6], [0.6, 0.5]])  # greedy top-1: all to expert 0
    assigned = balanced_assignment(scores)
    assert torch.bincount(assigned, minlength=2).tolist() == [2, 2]
    best = max((sum(scores[t, e].item() for t, e in enumerate(choice)), choice)
               for choice in itertools.product(range(2), repeat=4) if sum(choice) == 2)
    total = sum(scores[t, e].item() for t, e in enumerate(assigned.tolist()))
    assert total == pytest.approx(best[0])  # 2.8, the optimum (here two assignments reach it)
    padded = balanced_assignment(scores, torch.tensor([True, True, True, False]))  # capacity ceil(3 / 2) = 2
    assert padded[3].item() == 0 and torch.bincount(padded[:3], minlength=2).max() <= 2


def test_balanced_assignment_router_trains_balanced_and_infers_greedy(tmp_path) -> None:
    model = model_of("balanced_assignment", num_experts_per_tok=1, norm_topk_prob=False)
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads(model))  # gate sigmoid(h w_e)
    for loads in train(model, steps=4, batch=4, length=12):  # 48 tokens over 8 experts: 6 each
        assert torch.equal(loads, torch.full_like(loads, 6.0))
    model.eval()
    router = find_routers(model)[0][1]
    assert isinstance(router, BalancedAssignmentRouter)
    x = torch.randn(5, router.weight.shape[1])
    assert torch.equal(router(x).topk_ids[:, 0], (x @ router.weight.t()).argmax(dim=-1))  # greedy top-1
    model.save_pretrained(tmp_path)
    loaded = MoEForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------- replay
def test_replay_uses_the_given_experts_with_gates_from_the_current_scores() -> None:
    model = MoEForCausalLM(tiny_config(n_group=1, topk_group=1, topk_method="greedy")).eval()
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    replay = [torch.tensor([[[0, 1]] * 5, [[2, 3]] * 5]) for _ in model.config.moe_layer_indices]
    replay[0][1, 4] = NOT_RECORDED  # this position: the router's own choice
    with torch.no_grad():
        own = model(input_ids=ids).routings
        out = model(input_ids=ids, replay_routing=replay)
    for layer, routing in enumerate(out.routings):
        expected = replay[layer].reshape(-1, 2).clone()
        if layer == 0:
            expected[9] = own[0].topk_ids[9]
        assert torch.equal(routing.topk_ids, expected)
        s = routing.logits.sigmoid().gather(1, expected)
        torch.testing.assert_close(routing.topk_weights, s / s.sum(-1, keepdim=True) * 1.5)  # norm, scale 1.5
    with pytest.raises(ValueError, match="one expert-id tensor per MoE layer"):
        model(input_ids=ids, replay_routing=replay[:1])


def test_generation_records_its_routing_and_replay_gives_it_back_after_the_weights_moved() -> None:
    model = MoEForCausalLM(tiny_config(n_group=1, topk_group=1, topk_method="greedy")).eval()
    prompt = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(1))
    with RoutingRecorder(model) as recorder, torch.no_grad():
        sequences = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    replay = recorder.replay_routing(sequences.shape[1])
    assert [r.shape for r in replay] == [torch.Size([2, 9, 2])] * len(model.config.moe_layer_indices)
    assert (replay[0][:, -1] == NOT_RECORDED).all() and (replay[0][:, :-1] >= 0).all()
    with torch.no_grad():  # the trainer's policy has moved since the sample (RL): its routers now disagree
        for _, router in find_routers(model):
            router.weight.add_(torch.randn_like(router.weight))
        own = model(input_ids=sequences).routings
        replayed = model(input_ids=sequences, replay_routing=replay).routings
    assert any(not torch.equal(o.topk_ids.view(2, 9, 2)[:, :-1], r[:, :-1]) for o, r in zip(own, replay))
    for routing, recorded in zip(replayed, replay):
        assert torch.equal(routing.topk_ids.view(2, 9, 2)[:, :-1], recorded[:, :-1])


def test_training_with_replay_has_gradients_through_the_gates() -> None:
    model = MoEForCausalLM(tiny_config(n_group=1, topk_group=1, topk_method="greedy")).train()
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    replay = [torch.zeros(2, 6, 2, dtype=torch.long) + torch.tensor([0, 1]) for _ in model.config.moe_layer_indices]
    model(input_ids=ids, labels=ids, replay_routing=replay).loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads(model))
    for _, router in find_routers(model):  # the counters saw the replayed experts only
        assert router.tokens_per_expert[2:].sum() == 0 and router.tokens_per_expert[:2].tolist() == [12.0, 12.0]


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("fields", "field", "message"), [
    (dict(router_type="switch"), "router_type", "allowed values are"),
    (dict(balance_loss_scope="step"), "balance_loss_scope", "allowed values are"),
    (dict(comm_balance_alpha=-1.0), "comm_balance_alpha", ">= 0"),
    (dict(expert_choice_capacity_factor=0.0), "expert_choice_capacity_factor", "> 0"),
    (dict(hash_seed=-1), "hash_seed", ">= 0"),
    (dict(router_type="hash"), "router_type", "no group-limited"),  # tiny_config has n_group=4
    (dict(FLAT, router_type="hash", capacity_factor=1.0), "router_type", "capacity_factor"),
    (dict(FLAT, router_type="hash", num_nextn_predict_layers=1), "router_type", "MTP"),
    (dict(FLAT, router_type="expert_choice", aux_loss_alpha=0.01), "aux_loss_alpha", "balanced by construction"),
    (dict(FLAT, router_type="balanced_assignment"), "num_experts_per_tok", "1 expert"),
    (dict(FLAT, router_type="balanced_assignment", num_experts_per_tok=1), "router_type", "norm_topk_prob=False"),
    (dict(FLAT, comm_balance_alpha=0.01), "comm_balance_alpha", "n_group >= 2"),
])
def test_router_type_fields_are_validated(fields: dict, field: str, message: str) -> None:
    with pytest.raises(ConfigFieldError, match=message) as error:
        tiny_config(**fields)
    assert error.value.field == field and f"MoEConfig.{field}=" in str(error.value)


def test_router_type_fields_round_trip_through_config_json(tmp_path) -> None:
    config = tiny_config(**FLAT, router_type="hash", hash_seed=7, balance_loss_scope="global_batch")
    config.save_pretrained(tmp_path)
    loaded = MoEConfig.from_pretrained(tmp_path)
    assert (loaded.router_type, loaded.hash_seed, loaded.balance_loss_scope) == ("hash", 7, "global_batch")


def test_other_router_types_are_refused_on_export_to_other_families() -> None:
    from hf_moe.conversion.families import config_from_moe

    with pytest.raises(ValueError, match="router_type='hash'"):
        config_from_moe(tiny_config(**FLAT, router_type="hash"), "deepseek_v3")


def test_hash_model_generates_with_a_cache_like_its_full_forward() -> None:
    model = model_of("hash").eval()
    prompt = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sequences = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        greedy = model(input_ids=sequences).logits[:, 3:-1].argmax(-1)
    assert torch.equal(sequences[:, 4:], greedy)
