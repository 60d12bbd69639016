"""TRL's SFTTrainer trains hf_moe's whole objective (LM + MTP + balance terms) and MoECallback logs its `moe/`
metrics: TRL's fused LM head is served by MoEForCausalLM.forward, not by the backbone alone."""

from __future__ import annotations

import math

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.modeling.configuration import ConfigFieldError
from hf_moe.modeling.fused_head import FusedLMHeadOutput
from hf_moe.training import MoECallback, find_routers
from tests.conftest import tiny_config

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[dev]')")
datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_tokenizer():  # noqa: ANN201 - PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model() -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(tiny_config(num_nextn_predict_layers=1, mtp_loss_weight=0.3, aux_loss_alpha=0.05,
                                      seq_aux_loss_alpha=0.01, router_bias_update_rate=1e-3))


def sft_trainer(model: MoEForCausalLM, out: str, callback: MoECallback | None = None, **overrides: object):
    ids = torch.randint(3, 97, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids})
    fields = dict(output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=3,
                  learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                  dataloader_num_workers=0, lr_scheduler_type="constant", max_length=None)
    fields.update(overrides)
    return trl.SFTTrainer(model=model, args=trl.SFTConfig(**fields), train_dataset=data,
                          processing_class=tiny_tokenizer(), callbacks=[callback] if callback else None)


def test_sft_trains_mtp_and_balance_terms_and_logs_moe_metrics(tmp_path) -> None:
    model = tiny_model()
    mtp_before = {n: p.detach().clone() for n, p in model.mtp.named_parameters()}
    biases_before = torch.stack([r.e_score_correction_bias.clone() for _, r in find_routers(model)])
    callback = MoECallback()
    trainer = sft_trainer(model, str(tmp_path), callback)
    trainer.train()

    assert all(not torch.equal(p, mtp_before[n]) for n, p in model.mtp.named_parameters() if p.requires_grad)
    assert not torch.equal(torch.stack([r.e_score_correction_bias for _, r in find_routers(model)]), biases_before)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "moe/lm_loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["moe/mtp_loss"] > 0 and entry["moe/aux_loss"] > 0 and "moe/max_vio" in entry
        # TRL's loss = its NLL + router_aux_loss_coef (1.0) * aux_loss; aux_loss = MTP + hf_moe's balance terms
        assert math.isclose(entry["aux_loss"], entry["moe/mtp_loss"] + entry["moe/aux_loss"], rel_tol=1e-4)
        assert math.isclose(entry["loss"], entry["moe/lm_loss"] + entry["aux_loss"], rel_tol=1e-4)


def test_fused_forward_equals_the_models_own_losses() -> None:
    model = tiny_model().train()
    trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    assert "forward" not in vars(model)  # our forward kept; TRL's options recorded
    assert model.fused_head_options.outputs == ("log_probs", "entropy", "is_top1")
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.masked_fill(torch.arange(10) < 3, -100)  # a prompt that is not trained on
    torch.manual_seed(0)
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    torch.manual_seed(0)
    own = model(input_ids=ids, labels=labels)
    assert isinstance(fused, FusedLMHeadOutput)
    assert fused.label_mask.sum() == 2 * 7 and torch.equal(fused.label_mask, labels[:, 1:] != -100)
    nll = -fused.log_probs.sum() / fused.label_mask.sum()
    torch.testing.assert_close(nll, own.lm_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.aux_loss, own.mtp_loss + own.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-5, atol=1e-6)
    fused.loss.backward()
    assert all(p.grad is not None for p in model.mtp.parameters() if p.requires_grad)


def test_a_temperature_is_honoured() -> None:
    model = tiny_model().eval()
    trl.trainer.utils.add_fused_lm_head(model, temperature=0.5)
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
        logits = model(input_ids=ids).logits[:, :-1]
    expected = (logits / 0.5).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(fused.log_probs, expected, rtol=1e-5, atol=1e-5)


def test_router_aux_loss_coef_other_than_one_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigFieldError, match="router_aux_loss_coef=0.01 is invalid.*aux_loss_alpha"):
        sft_trainer(tiny_model(), str(tmp_path), router_aux_loss_coef=0.01)


def test_dpo_shares_the_path_trains_mtp_and_logs_moe_metrics(tmp_path) -> None:
    model = tiny_model()
    mtp_before = {n: p.detach().clone() for n, p in model.mtp.named_parameters()}
    generator = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, 97, (n,), generator=generator).tolist())

    data = datasets.Dataset.from_list([{"prompt": words(5), "chosen": words(4), "rejected": words(4)} for _ in range(8)])
    args = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                         max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True,
                         max_length=None)
    trainer = trl.DPOTrainer(model=model, ref_model=tiny_model(), args=args, train_dataset=data,
                             processing_class=tiny_tokenizer(), callbacks=[MoECallback()])
    trainer.train()
    assert all(not torch.equal(p, mtp_before[n]) for n, p in model.mtp.named_parameters() if p.requires_grad)
    logs = [entry for entry in trainer.state.log_history if "moe/mtp_loss" in entry]
    assert len(logs) == 2
    for entry in logs:  # TRL's aux_loss (added to the DPO loss) is hf_moe's MTP + balance terms
        assert math.isclose(entry["aux_loss"], entry["moe/mtp_loss"] + entry["moe/aux_loss"], rel_tol=1e-4)
