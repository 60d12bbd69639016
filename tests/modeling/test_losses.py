"""Balance losses against hand computations, and how the model adds them to `loss`."""

from __future__ import annotations

import math

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.modeling.losses import moe_auxiliary_loss
from hf_moe.modeling.routing import RouterOutput
from tests.conftest import tiny_config

N, K = 4, 2
LOGITS = [  # (batch 2, length 3, experts 4); the last token of sequence 1 is padding
    [[2.0, 1.0, -1.0, 0.5], [0.0, 3.0, 1.0, -2.0], [1.5, -0.5, 2.5, 0.0]],
    [[-1.0, 0.0, 1.0, 2.0], [0.5, 0.25, -0.5, 1.0], [9.0, 9.0, 9.0, 9.0]],
]
# experts the router chose (with a balancing bias): token (1, 0) took expert 0 where the unbiased top-2 is {3, 2}
CHOSEN = [[[0, 1], [1, 2], [2, 0]], [[0, 3], [3, 0], [0, 1]]]
MASK = [[1, 1, 1], [1, 1, 0]]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def routing() -> RouterOutput:
    return RouterOutput(logits=torch.tensor(LOGITS).view(6, N), topk_ids=torch.tensor(CHOSEN).view(6, K),
                        topk_weights=torch.ones(6, K))


def aux(scoring: str = "sigmoid", **coefficients: float) -> float:
    config = tiny_config(n_routed_experts=N, num_experts_per_tok=K, n_group=1, topk_group=1, scoring_func=scoring,
                         topk_method="greedy", aux_loss_num_devices=coefficients.pop("devices", 1), **coefficients)
    return moe_auxiliary_loss([routing()], torch.tensor(MASK), (2, 3), config).item()


def normalised(logits: list[float], scoring: str) -> list[float]:
    """s' = s / sum_j s_j with s = sigmoid (DeepSeek-V3 eq. 19) or s = softmax (already sums to one)."""
    if scoring == "softmax":
        exps = [math.exp(x) for x in logits]
        return [e / sum(exps) for e in exps]
    sig = [1 / (1 + math.exp(-x)) for x in logits]
    return [s / sum(sig) for s in sig]


def valid_tokens() -> list[tuple[list[float], list[int]]]:
    return [(LOGITS[b][t], CHOSEN[b][t]) for b in range(2) for t in range(3) if MASK[b][t]]


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_expert_level_loss_is_alpha_n_sum_f_p(scoring: str) -> None:
    tokens = valid_tokens()  # 5 valid tokens, padding excluded
    f = [sum(i in chosen for _, chosen in tokens) / (K * len(tokens)) for i in range(N)]  # share of routed slots
    p = [sum(normalised(logits, scoring)[i] for logits, _ in tokens) / len(tokens) for i in range(N)]
    expected = 0.01 * N * sum(fi * pi for fi, pi in zip(f, p))
    assert aux(scoring, aux_loss_alpha=0.01) == pytest.approx(expected, rel=1e-6)


def test_switch_loss_with_one_expert_per_token() -> None:
    """Switch Transformer eq. 4-6 with K = 1 and softmax: alpha * N * sum_i f_i P_i, f_i = share of tokens."""
    logits = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 3.0, 1.0, 0.0], [0.5, 0.0, 2.0, 0.0]])
    top1 = logits.argmax(dim=-1, keepdim=True)
    config = tiny_config(n_routed_experts=N, num_experts_per_tok=1, n_group=1, topk_group=1, scoring_func="softmax",
                         topk_method="greedy", aux_loss_alpha=0.5)
    loss = moe_auxiliary_loss([RouterOutput(logits, top1, torch.ones(3, 1))], None, (1, 3), config).item()
    f = [0.0, 1 / 3, 1 / 3, 1 / 3]  # experts 3, 1, 2 chosen once each
    p = [sum(normalised(row, "softmax")[i] for row in logits.tolist()) / 3 for i in range(N)]
    assert loss == pytest.approx(0.5 * N * sum(fi * pi for fi, pi in zip(f, p)), rel=1e-6)


def test_device_level_loss_groups_experts_by_device() -> None:
    """DeepSeek-V2 eqs. 15-17 with 2 devices of 2 experts: f'_d = mean f_i, P'_d = sum P_i."""
    tokens = valid_tokens()
    f = [N / (K * len(tokens)) * sum(i in chosen for _, chosen in tokens) for i in range(N)]
    p = [sum(normalised(logits, "sigmoid")[i] for logits, _ in tokens) / len(tokens) for i in range(N)]
    expected = 0.1 * ((f[0] + f[1]) / 2 * (p[0] + p[1]) + (f[2] + f[3]) / 2 * (p[2] + p[3]))
    assert aux(device_aux_loss_alpha=0.1, devices=2) == pytest.approx(expected, rel=1e-6)


def test_sequence_wise_loss_uses_the_unbiased_top_k_per_sequence() -> None:
    """DeepSeek-V3 eqs. 17-20: per sequence, f_i = N/(K T) #{t: s_i,t in TopK(s_t)} (unbiased scores, not the
    biased choice), P_i = mean_t s'_i,t; averaged over sequences; padding ignored."""
    per_sequence = []
    for b in range(2):
        rows = [LOGITS[b][t] for t in range(3) if MASK[b][t]]
        top = [sorted(range(N), key=lambda i, row=row: -row[i])[:K] for row in rows]  # sigmoid is monotone
        f = [N / (K * len(rows)) * sum(i in chosen for chosen in top) for i in range(N)]
        p = [sum(normalised(row, "sigmoid")[i] for row in rows) / len(rows) for i in range(N)]
        per_sequence.append(sum(fi * pi for fi, pi in zip(f, p)))
    expected = 1e-2 * sum(per_sequence) / 2
    assert aux(seq_aux_loss_alpha=1e-2) == pytest.approx(expected, rel=1e-6)
    # the biased choice (CHOSEN) gives a different value, so the test tells the two apart
    biased = []
    for b in range(2):
        rows = [(LOGITS[b][t], CHOSEN[b][t]) for t in range(3) if MASK[b][t]]
        f = [N / (K * len(rows)) * sum(i in chosen for _, chosen in rows) for i in range(N)]
        p = [sum(normalised(row, "sigmoid")[i] for row, _ in rows) / len(rows) for i in range(N)]
        biased.append(sum(fi * pi for fi, pi in zip(f, p)))
    assert aux(seq_aux_loss_alpha=1e-2) != pytest.approx(1e-2 * sum(biased) / 2, rel=1e-3)


def test_router_z_loss() -> None:
    """ST-MoE eq. 5: coef * mean over tokens of logsumexp(logits)^2 (padding excluded)."""
    tokens = valid_tokens()
    expected = 1e-3 * sum(math.log(sum(math.exp(x) for x in logits)) ** 2 for logits, _ in tokens) / len(tokens)
    assert aux(router_z_loss_coef=1e-3) == pytest.approx(expected, rel=1e-6)


def test_coefficients_add_up_and_zero_means_none() -> None:
    parts = [aux(aux_loss_alpha=0.01), aux(device_aux_loss_alpha=0.1, devices=2), aux(seq_aux_loss_alpha=1e-2),
             aux(router_z_loss_coef=1e-3)]
    combined = aux(aux_loss_alpha=0.01, device_aux_loss_alpha=0.1, devices=2, seq_aux_loss_alpha=1e-2,
                   router_z_loss_coef=1e-3)
    assert combined == pytest.approx(sum(parts), rel=1e-6)
    config = tiny_config(n_routed_experts=N, num_experts_per_tok=K, n_group=1, topk_group=1)
    assert moe_auxiliary_loss([routing()], None, (2, 3), config) is None


def loss_config(**overrides: object) -> object:
    fields = dict(aux_loss_alpha=0.01, seq_aux_loss_alpha=1e-3, router_z_loss_coef=1e-3, device_aux_loss_alpha=0.02,
                  aux_loss_num_devices=2, num_nextn_predict_layers=1, mtp_loss_weight=0.3)
    fields.update(overrides)
    return tiny_config(**fields)


def test_model_adds_every_loss_and_reports_each_separately() -> None:
    model = MoEForCausalLM(loss_config()).train()
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    # aux_loss sums the balance losses over every MoE layer, MTP blocks included (2 decoder layers + 1 MTP block)
    assert len(out.routings) == 3
    expected_aux = moe_auxiliary_loss(list(out.routings), mask, (2, 9), model.config)
    torch.testing.assert_close(out.aux_loss, expected_aux)
    per_layer = [moe_auxiliary_loss([r], mask, (2, 9), model.config) for r in out.routings]
    torch.testing.assert_close(out.aux_loss, sum(per_layer))
    torch.testing.assert_close(out.loss, out.lm_loss + out.mtp_loss + out.aux_loss)
    assert out.aux_loss > 0 and out.mtp_loss > 0
    out.aux_loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # the aux loss trains the router

    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask)
    assert plain.aux_loss is None and plain.mtp_loss is None and plain.loss is None


def test_trainer_token_normalisation_weights_aux_by_the_batch_share() -> None:
    """With the Trainer's `num_items_in_batch` (tokens of all accumulated micro-batches) the LM and MTP losses
    are sums / num_items, so the per-batch aux loss is weighted by this batch's share of those tokens."""
    model = MoEForCausalLM(loss_config()).train()
    ids = torch.randint(3, 97, (2, 9))
    plain = model(input_ids=ids, labels=ids)
    total_items = torch.tensor(64)  # e.g. 16 from this micro-batch, 48 from others
    scaled = model(input_ids=ids, labels=ids, num_items_in_batch=total_items)
    share = 16 / 64
    torch.testing.assert_close(scaled.lm_loss, plain.lm_loss * share)
    torch.testing.assert_close(scaled.aux_loss, plain.aux_loss)  # reported per batch
    torch.testing.assert_close(scaled.loss, scaled.lm_loss + scaled.mtp_loss + plain.aux_loss * share)
    # the MTP loss is normalised like the LM loss: a sum over its (fewer) targets / num_items
    mtp_targets = 2 * (9 - 2)  # depth 1 has T - 2 targets per sequence
    torch.testing.assert_close(scaled.mtp_loss, plain.mtp_loss * mtp_targets / 64)


def test_total_loss_adds_the_parts_and_weights_aux_by_the_batch_share() -> None:
    """loss = lm + mtp + share * aux, share = this batch's targets / num_items_in_batch (1 without it)."""
    from hf_moe.modeling.losses import total_loss

    config = tiny_config(n_routed_experts=N, num_experts_per_tok=K, n_group=1, topk_group=1, topk_method="greedy",
                         aux_loss_alpha=0.01)
    lm, mtp, aux_value = torch.tensor(2.0), torch.tensor(0.5), torch.tensor(0.1)
    labels = torch.tensor([[5, 6, -100, 7], [5, -100, -100, 8]])  # targets at positions 1.. : 6, 7 and 8
    parts = total_loss(config, lm, mtp, aux_value, labels=labels)
    assert parts.total.item() == pytest.approx(2.0 + 0.5 + 0.1)
    assert (parts.lm, parts.mtp, parts.aux) == (lm, mtp, aux_value)
    parts = total_loss(config, lm, mtp, aux_value, labels=labels, num_items_in_batch=12)
    assert parts.total.item() == pytest.approx(2.0 + 0.5 + 0.1 * 3 / 12)
    assert total_loss(config, None, None, aux_value).total is None  # no labels: no loss, aux still reported
    assert total_loss(config, None, None, aux_value).aux is aux_value


def test_total_loss_adds_the_mtp_routers_balance_over_their_valid_positions() -> None:
    from hf_moe.modeling.losses import total_loss

    config = tiny_config(n_routed_experts=N, num_experts_per_tok=K, n_group=1, topk_group=1, topk_method="greedy",
                         router_z_loss_coef=1e-3)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    lm = torch.tensor(1.0)
    parts = total_loss(config, lm, None, torch.tensor(0.25), mtp_routings=[(routing(), valid)])
    tokens = [LOGITS[b][t] for b in range(2) for t in range(3) if valid[b][t]]
    z = 1e-3 * sum(math.log(sum(math.exp(x) for x in logits)) ** 2 for logits in tokens) / len(tokens)
    assert parts.aux.item() == pytest.approx(0.25 + z, rel=1e-6)
    assert parts.total.item() == pytest.approx(1.0 + 0.25 + z, rel=1e-6)
