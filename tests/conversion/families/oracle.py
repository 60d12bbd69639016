"""The oracles every family record is held to, and the tiny models they run on.

A record's oracle cases are `CASES` in tests/conversion/families/test_<family>.py: tiny configs of transformers'
own class. `test_oracles.py` runs every case of every registered record:
- MoE families: transformers' own ForCausalLM with every weight randomised (norms not ones, router weights,
  DeepSeek-V3's balancing bias non-zero), converted to hf_moe, loaded strictly into MoEForCausalLM, both run in
  eval/fp32/eager (padded batch included); then exported back (identical tensors, strict load into transformers'
  class, same logits) in both layouts;
- dense families: a checkpoint written by transformers' own class, upcycled with exact recipes, loaded with
  AutoModelForCausalLM: same fp32 logits (function preservation).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from hf_moe.conversion.families import RECORDS
from hf_moe.modeling.configuration import MoEConfig
from hf_moe.modeling.model import MoEForCausalLM

TOL = 1e-5
#: the released checkpoints' per-expert naming: the MoE block's name and the gate, up and down projections
PER_EXPERT = ("mlp", ("gate_proj", "up_proj", "down_proj"))


class Case(NamedTuple):
    """A tiny config of a family: its transformers config class, fields, whether the batch is left-padded, and
    (MoE families) the per-expert naming of its released checkpoints."""

    config_class: type[PreTrainedConfig]
    fields: dict
    left_padding: bool = False
    per_expert: tuple | None = PER_EXPERT  # (moe block, (gate, up, down)[, renames]) or None: one layout
    renames: tuple[tuple[str, str], ...] = ()  # (transformers', original) key parts the original layout renames

    def original(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' state dict in the released checkpoints' naming (`per_expert`, then `renames`)."""
        out = dict(state) if self.per_expert is None else per_expert(state, self.per_expert)
        for theirs, original in self.renames:
            out = {k.replace(theirs, original): v for k, v in out.items()}
        return out

    @property
    def family(self) -> str:
        return self.config_class.model_type

    def config(self, **overrides: object) -> PreTrainedConfig:
        return self.config_class(**{**self.fields, **overrides})


def cases(kind: type | None = None) -> dict[str, Case]:
    """Every oracle case of the registered records (of record type `kind`), by case name."""
    found: dict[str, Case] = {}
    for name, record in RECORDS.items():
        if kind is None or isinstance(record, kind):
            found.update(importlib.import_module(f"tests.conversion.families.test_{name}").CASES)
    return found


# ------------------------------------------------------------------------------------------- MoE families
TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)
MLA = dict(kv_lora_rank=32, num_key_value_heads=4, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, intermediate_size=96,
           moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3)  # fmt: skip


def randomise(model: torch.nn.Module) -> None:
    """Every parameter and persistent buffer random (norm weights around 1, routers decisive)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight", "norm_f.weight")) or "layernorm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif ".gate.weight" in name or ".router." in name:  # (Phi-3.5-MoE, gpt-oss, DBRX: router)
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))


def family_model(case: Case) -> tuple[torch.nn.Module, PreTrainedConfig]:
    torch.manual_seed(0)
    config = case.config()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation="eager")
    randomise(model)
    return model.eval(), config


def inputs(left_padding: bool, vocab_size: int = TINY["vocab_size"]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (2, 11), generator=gen)
    mask = torch.ones_like(input_ids)
    if left_padding:
        mask[1, :4] = 0
    return input_ids, mask


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def ours_from(moe_config: MoEConfig, state: dict[str, torch.Tensor]) -> MoEForCausalLM:
    moe_config._attn_implementation = "eager"
    model = MoEForCausalLM(moe_config).eval()
    result = model.load_state_dict(state, strict=False)
    # hf_moe state dicts leave out a tied head (it is the embedding)
    allowed_missing = {"lm_head.weight"} if moe_config.tie_word_embeddings else set()
    assert set(result.missing_keys) <= allowed_missing, result.missing_keys
    assert not result.unexpected_keys, result.unexpected_keys
    return model


def per_expert(state: dict[str, torch.Tensor], naming: tuple = PER_EXPERT) -> dict[str, torch.Tensor]:
    """The original checkpoint naming, written independently of the tables (per-expert keys). `naming` is
    (moe block, (gate, up, down)), optionally followed by (transformers' key suffix, original suffix) renames of
    other keys (e.g. a balancing bias stored elsewhere in the released checkpoints)."""
    moe, (gate, up, down), *more = naming
    renames = more[0] if more else ()
    out = {}
    for key, tensor in state.items():
        prefix, _, name = key.rpartition(".mlp.")
        if name == "experts.gate_up_proj":
            for e, fused in enumerate(tensor):
                g, u = fused.chunk(2, dim=0)
                out[f"{prefix}.{moe}.experts.{e}.{gate}.weight"] = g.clone()
                out[f"{prefix}.{moe}.experts.{e}.{up}.weight"] = u.clone()
        elif name == "experts.down_proj":
            for e, d in enumerate(tensor):
                out[f"{prefix}.{moe}.experts.{e}.{down}.weight"] = d.clone()
        elif name == "gate.weight":
            out[f"{prefix}.{moe}.gate.weight"] = tensor
        else:
            out[key] = tensor
    for ours, theirs in renames:
        out = {k[: -len(ours)] + theirs if k.endswith(ours) else k: v for k, v in out.items()}
    return out


def released_mtp_checkpoint(theirs: torch.nn.Module, layer: torch.nn.Module, n: int) -> dict[str, torch.Tensor]:
    """`theirs`'s weights plus an MTP module at layer `n` (its decoder `layer`, random enorm/hnorm/eh_proj and
    shared-head norm, the model's head and embedding) in the released per-expert layout of DeepSeek-V3 (GLM-4.5
    shares it), written by hand."""
    disk = per_expert({f"model.layers.{n}.{k}": v for k, v in layer.state_dict().items()})
    h = theirs.config.hidden_size
    disk.update({
        f"model.layers.{n}.enorm.weight": 1 + 0.2 * torch.randn(h), f"model.layers.{n}.hnorm.weight": 1 + 0.2 * torch.randn(h),
        f"model.layers.{n}.eh_proj.weight": 0.1 * torch.randn(h, 2 * h),
        f"model.layers.{n}.shared_head.norm.weight": 1 + 0.2 * torch.randn(h),
        f"model.layers.{n}.shared_head.head.weight": theirs.lm_head.weight.detach().clone(),
        f"model.layers.{n}.embed_tokens.weight": theirs.model.embed_tokens.weight.detach().clone(),
    })  # fmt: skip
    disk.update(per_expert(theirs.state_dict()))
    return disk


# ----------------------------------------------------------------------------------------- dense families
DENSE_TINY = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
# recipe name -> upcycle arguments (N experts, top-k, granularity G, shared S): all exact
RECIPES = {
    "copy": dict(num_experts=4, top_k=2),
    "fine_grained": dict(num_experts=8, top_k=4, granularity=4),  # 2 copies of 4 shards, top-k = 1 copy
    "fine_grained_shared": dict(num_experts=6, top_k=4, granularity=3, shared_experts=1),  # R=2, 3 copies, m=2
}


def randomise_dense(model: PreTrainedModel, seed: int = 0) -> PreTrainedModel:
    """Every weight random and O(0.15), norms 1 + noise, so the FFN and every bias/norm matter for the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model.eval()


def dense_checkpoint(folder: Path, case: Case, **overrides: object) -> PreTrainedModel:
    """A randomised model of `case` (config fields overridden) saved with transformers' save_pretrained."""
    model = randomise_dense(AutoModelForCausalLM.from_config(case.config(**overrides)))
    model.save_pretrained(folder)
    return model


def probe_ids(vocab: int = 80, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def max_logit_diff(dense: PreTrainedModel, out: Path) -> tuple[float, float]:
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(moe).__name__ == "MoEForCausalLM"
    ids = probe_ids(dense.config.vocab_size)
    with torch.no_grad():
        expected, got = dense(ids).logits, moe(ids).logits
    return (expected - got).abs().max().item(), expected.abs().max().item()
