"""LoRA recipe: adapters on attention and shared experts (and on request the fused routed experts); the merged
model equals the adapted one and is a plain hf_moe model again; base weights stay bit-identical in training."""

from __future__ import annotations

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.training.recipes import apply_recipe, lora_targets
from tests.conftest import tiny_config, tiny_gqa_config


def tiny_model(make_config=tiny_config) -> MoEForCausalLM:
    # moe_intermediate_size=12: gate_up_proj (E, 24, 32) is not square, so a transposed LoRA delta cannot fit
    torch.manual_seed(0)
    return MoEForCausalLM(make_config(moe_intermediate_size=12))


def randomise_lora_b(model: torch.nn.Module) -> int:
    """peft starts lora_B at zero (adapter = identity); make it non-zero so that merging matters."""
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
                count += 1
    return count


@pytest.mark.parametrize("make_config", [tiny_config, tiny_gqa_config], ids=["mla", "gqa"])
@pytest.mark.parametrize("routed_experts", [False, True], ids=["attention-shared", "with-routed-experts"])
def test_merged_model_equals_adapted_model(make_config, routed_experts: bool) -> None:
    model = tiny_model(make_config)
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        base_logits = model(ids).logits
    report = apply_recipe(model, "lora", r=4, lora_alpha=8, routed_experts=routed_experts, verbose=False)
    adapted = report.model
    assert randomise_lora_b(adapted) > 0
    adapted.eval()
    with torch.no_grad():
        adapted_logits = adapted(ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapters do something

    merged = adapted.merge_and_unload()
    assert type(merged) is MoEForCausalLM
    assert sorted(n for n, _ in merged.named_parameters()) == sorted(n for n, _ in tiny_model(make_config).named_parameters())
    with torch.no_grad():
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_routed_expert_adapters_change_the_experts() -> None:
    """With routed_experts=True the fused expert weights themselves are adapted (merge changes them)."""
    model = tiny_model()
    before = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    adapted = apply_recipe(model, "lora", r=2, routed_experts=True, verbose=False).model
    randomise_lora_b(adapted)
    merged = adapted.merge_and_unload()
    after = merged.model.layers[1].mlp.experts.gate_up_proj
    assert after.shape == before.shape
    assert all(not torch.equal(after[e], before[e]) for e in range(after.shape[0]))


def test_default_targets_are_attention_and_shared_experts() -> None:
    model = tiny_model()
    targets = lora_targets(model)
    assert "mlp.experts" not in " ".join(targets)
    assert {"shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"} <= set(targets)
    assert {"self_attn.q_a_proj", "self_attn.kv_b_proj", "self_attn.o_proj"} <= set(targets)
    assert "mlp.gate_proj" not in targets and "mlp.gate_proj" in lora_targets(model, dense_ffn=True)
    report = apply_recipe(model, "lora", r=4, verbose=False)
    assert report.parts["lora"][0] == report.trainable > 0
    assert all(trainable == 0 for part, (trainable, _) in report.parts.items() if part != "lora")
    with pytest.raises(ValueError, match="lora_dropout"):
        apply_recipe(tiny_model(), "lora", routed_experts=True, lora_dropout=0.1, verbose=False)


def test_lora_training_leaves_base_weights_bit_identical() -> None:
    model = tiny_model()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapted = apply_recipe(model, "lora", r=4, routed_experts=True, verbose=False).model
    lora_before = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(adapted.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    adapted.train()
    for _ in range(3):
        ids = torch.randint(3, 97, (4, 12), generator=generator)
        adapted(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in adapted.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, lora_before[name]), name
    unwrapped = adapted.get_base_model()
    for name, param in unwrapped.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(param, base[key]), name


# ------------------------------------------------------------------------------ adapter round trip after training
def train_with_callback(adapted: torch.nn.Module, out: str, **callback_options: object) -> None:
    from transformers import Trainer, TrainingArguments

    from hf_moe.training import MoECallback

    ids = torch.randint(3, 97, (16, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=10)
    Trainer(model=adapted, args=args, train_dataset=data, callbacks=[MoECallback(**callback_options)]).train()


def biased_model() -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(tiny_config(moe_intermediate_size=12, router_bias_update_rate=0.05,
                                      num_nextn_predict_layers=1))


@pytest.mark.parametrize("bias_update", [False, True], ids=["default-biases-off", "biases-saved-with-adapter"])
def test_saved_adapter_on_a_fresh_base_reproduces_the_trained_model(tmp_path, bias_update: bool) -> None:
    from peft import PeftModel

    from hf_moe.training import find_routers

    torch.set_num_threads(1)
    base_dir = tmp_path / "base"
    biased_model().save_pretrained(base_dir)
    model = MoEForCausalLM.from_pretrained(base_dir)
    before = torch.stack([r.e_score_correction_bias.clone() for _, r in find_routers(model)])
    options = {"bias_update": True} if bias_update else {}  # the default: off
    adapted = apply_recipe(model, "lora", r=4, verbose=False, **options).model
    train_with_callback(adapted, str(tmp_path / "run"))
    after = torch.stack([r.e_score_correction_bias for _, r in find_routers(adapted)])
    assert torch.equal(after, before) != bias_update  # biases move only where the adapter saves them
    adapted.save_pretrained(tmp_path / "adapter")

    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    adapted.eval()
    with torch.no_grad():
        trained = adapted(ids).logits
    fresh = PeftModel.from_pretrained(MoEForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        reloaded = fresh(ids).logits
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    if bias_update:  # router weights are saved, not trained
        assert not any(p.requires_grad for n, p in adapted.named_parameters() if "mlp.gate." in n)


def test_bias_updates_on_a_plain_peft_model_are_refused(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(biased_model(), LoraConfig(r=4, target_modules=["o_proj"]))
    with pytest.raises(ValueError, match="adapter does not save them.*bias_update=True"):
        train_with_callback(adapted, str(tmp_path / "run"))
    from transformers import TrainerControl, TrainerState

    from hf_moe.training import MoECallback  # measuring only (no bias update) is fine
    MoECallback(update_biases=False).on_train_begin(None, TrainerState(), TrainerControl(), model=adapted)
