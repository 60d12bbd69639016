"""The model's entry checks (hf_moe.modeling.inputs), padding under capacity, and strict loading by default.

Every bad input is refused with a ValueError (TypeError for a non-tensor) naming what is wrong, before torch
sees it; valid inputs (ignore index, padding masks, cached decoding) still run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_moe import MoEForCausalLM, MoEModel
from hf_moe.modeling.routing import drop_over_capacity
from tests.conftest import tiny_config

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(tiny_config()).eval()


def ids(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


BAD_INPUTS = [
    ("neither", lambda m: {}, "exactly one of input_ids or inputs_embeds"),
    ("both", lambda m: {"input_ids": ids(), "inputs_embeds": m.model.embed_tokens(ids())},
     "exactly one of input_ids or inputs_embeds"),
    ("empty batch", lambda m: {"input_ids": torch.zeros(0, 6, dtype=torch.long)}, r"\(0, 6\): the batch is empty"),
    ("length 0", lambda m: {"input_ids": torch.zeros(2, 0, dtype=torch.long)}, r"\(2, 0\): the sequences are empty"),
    ("empty embeds", lambda m: {"inputs_embeds": torch.zeros(2, 0, 32)}, "sequences are empty"),
    ("id = vocab_size", lambda m: {"input_ids": torch.full((1, 4), VOCAB)}, rf"token id {VOCAB}, .*vocab_size={VOCAB}"),
    ("negative id", lambda m: {"input_ids": torch.tensor([[5, -1, 7]])}, rf"token id -1, .*vocab_size={VOCAB}"),
    ("float ids", lambda m: {"input_ids": ids().float()}, "integer token ids.*float32"),
    ("bool ids", lambda m: {"input_ids": ids() > 50}, "integer token ids.*bool"),
    ("1-D ids", lambda m: {"input_ids": ids()[0]}, r"\(batch_size, sequence_length\), got \(6,\)"),
    ("embeds width", lambda m: {"inputs_embeds": torch.randn(2, 6, 7)}, r"hidden_size=32\), got \(2, 6, 7\)"),
    ("labels shorter", lambda m: {"input_ids": ids(), "labels": ids()[:, :5]}, r"labels must have the shape .*\(2, 5\)"),
    ("labels batch", lambda m: {"input_ids": ids(), "labels": ids()[:1]}, r"labels must have the shape .*\(1, 6\)"),
    ("labels = vocab_size", lambda m: {"input_ids": ids(), "labels": torch.full((2, 6), VOCAB)},
     rf"labels holds {VOCAB}: .*vocab_size={VOCAB}\) or -100"),
    ("labels = -5", lambda m: {"input_ids": ids(), "labels": torch.full((2, 6), -5)}, "labels holds -5"),
    ("float labels", lambda m: {"input_ids": ids(), "labels": ids().float()}, "labels must hold integer"),
    ("shift_labels", lambda m: {"input_ids": ids(), "labels": ids(), "shift_labels": ids()[:, 1:]},
     "shift_labels must have the shape"),
    ("mask batch", lambda m: {"input_ids": ids(), "attention_mask": torch.ones(1, 6, dtype=torch.long)},
     r"attention_mask has shape \(1, 6\)"),
    ("mask short", lambda m: {"input_ids": ids(), "attention_mask": torch.ones(2, 5, dtype=torch.long)},
     r"attention_mask has shape \(2, 5\)"),
]


@pytest.mark.parametrize(("case", "make", "message"), BAD_INPUTS, ids=[c for c, _, _ in BAD_INPUTS])
def test_bad_inputs_are_named(model: MoEForCausalLM, case: str, make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model(**make(model))


def test_list_ids_are_a_type_error(model: MoEForCausalLM) -> None:
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        model(input_ids=[[1, 2, 3]])


def test_train_mode_fused_loss_checks_labels_too() -> None:
    """The fused LM-head + loss path (CPU fp32 training) would gather out of bounds: refused the same way."""
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config()).train()
    with pytest.raises(ValueError, match=rf"labels holds {VOCAB}"):
        model(input_ids=ids(), labels=torch.full((2, 6), VOCAB))


def test_base_model_checks_its_inputs() -> None:
    torch.manual_seed(0)
    base = MoEModel(tiny_config()).eval()
    with pytest.raises(ValueError, match=rf"token id {VOCAB}"):
        base(input_ids=torch.full((1, 3), VOCAB))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        base(input_ids=ids(), inputs_embeds=base.embed_tokens(ids()))


def test_valid_edge_inputs_still_run(model: MoEForCausalLM) -> None:
    """Ignore index, ids 0 and vocab_size - 1, padding masks and cached decoding pass the checks."""
    x = ids()
    x[0, 0], x[1, -1] = 0, VOCAB - 1
    labels = x.clone()
    labels[:, :2] = -100
    mask = torch.ones_like(x)
    mask[1, 4:] = 0
    out = model(input_ids=x, attention_mask=mask, labels=labels, use_cache=True)
    assert torch.isfinite(out.loss)
    step = model(input_ids=x[:, -1:], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                 cache=out.cache)
    assert step.logits.shape == (2, 1, VOCAB)
    assert model(inputs_embeds=model.model.embed_tokens(x)).logits.shape == (2, 6, VOCAB)


def test_both_inputs_no_longer_silently_ignore_input_ids(model: MoEForCausalLM) -> None:
    """Before: input_ids was dropped without a word when inputs_embeds came too."""
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids(), inputs_embeds=torch.zeros(2, 6, 32))


# ------------------------------------------------------------------------------------ capacity and padding
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_takes_no_capacity(side: str) -> None:
    """Under capacity_factor, real tokens' outputs are the same with and without extra padding in the batch."""
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config(capacity_factor=0.5, n_group=1, topk_group=1)).eval()
    x = ids(2, 8)
    plain = model(input_ids=x, attention_mask=torch.ones_like(x))
    assert any((r.topk_weights == 0).any() for r in plain.routings), "the capacity must drop something here"
    pad = torch.zeros(2, 8, dtype=torch.long)
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    padded_ids = torch.cat([x, pad], 1) if side == "right" else torch.cat([pad, x], 1)
    padded_mask = torch.cat([ones, zeros], 1) if side == "right" else torch.cat([zeros, ones], 1)
    real = slice(0, 8) if side == "right" else slice(8, 16)
    position_ids = (padded_mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(input_ids=padded_ids, attention_mask=padded_mask, position_ids=position_ids)
    torch.testing.assert_close(padded.logits[:, real], plain.logits, atol=1e-5, rtol=1e-5)


def test_drop_over_capacity_ignores_masked_tokens() -> None:
    """Masked rows take no slot, count nothing and are dropped; real rows see exactly the unpadded decision."""
    generator = torch.Generator().manual_seed(0)
    topk_ids = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(20)])
    weights = torch.rand(20, 2, generator=generator)
    mask = torch.rand(20, generator=generator) > 0.4
    masked = drop_over_capacity(topk_ids, weights, 8, 0.75, mask)
    assert torch.equal(masked[mask], drop_over_capacity(topk_ids[mask], weights[mask], 8, 0.75))
    assert not masked[~mask].any()
    assert torch.equal(drop_over_capacity(topk_ids, weights, 8, 0.75, torch.ones(20, dtype=torch.bool)),
                       drop_over_capacity(topk_ids, weights, 8, 0.75))


# ------------------------------------------------------------------------------------------- strict loading
def test_strict_loading_when_config_has_no_architectures(tmp_path) -> None:
    """A config.json without `architectures` (hand-written, stripped) loads strictly: a missing weight is an
    error, not a silently re-initialised tensor."""
    torch.manual_seed(0)
    MoEForCausalLM(tiny_config()).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("architectures")
    config_file.write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"Missing weights: model\.norm\.weight"):
        MoEForCausalLM.from_pretrained(tmp_path)
    assert MoEForCausalLM.from_pretrained(tmp_path, strict=False) is not None
