"""TRL's fused LM head, served by `MoEForCausalLM.forward(fused_lm_head=True)` so hf_moe's whole objective trains.

TRL 1.x trainers (SFT, DPO, KTO, GRPO, RLOO) call `trl.trainer.utils.add_fused_lm_head(model, ...)`, which replaces
`model.forward` on the instance with a function that runs the *backbone* and TRL's own chunked LM head. For an hf_moe
model that would drop the multi-token-prediction loss (DeepSeek-V3 eq. 25) and every balance term, and replace them
with Mixtral's softmax balancing loss. `MoEForCausalLM.__setattr__` keeps its own forward instead and records the
options TRL asked for (`FusedHeadOptions`: temperature, which per-token fields); the forward then returns TRL's output
contract (`FusedLMHeadOutput`) from the full model:

    log_probs, entropy, is_top1, ...   per next-token position, 0 where the label is -100 (TRL's fields)
    aux_loss                           mtp_loss + balance_loss: what TRL adds to its NLL, times `router_aux_loss_coef`
                                       (`MoEConfig.router_aux_loss_coef`, fixed at 1.0)
    loss                               NLL of the temperature-scaled distribution (mean over targets) + aux_loss
    lm_loss, mtp_loss, balance_loss    the parts, for `hf_moe.training.MoECallback`'s `moe/` metrics

The logits are materialised (TRL's kernel avoids that); per-token quantities are computed in fp32. TRL passes no
`num_items_in_batch` to the model, so the MTP loss is this micro-batch's mean, like the balance terms; TRL divides
`aux_loss` by the gradient-accumulation steps itself (SFT). Trainers' paths that build full logits without labels
(SFT's `compute_loss_func`, label smoothing) compute their own loss and leave MTP and balance terms out.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import ModelOutput

from .losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: Per-token fields TRL may ask for (`add_fused_lm_head(outputs=...)`).
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class FusedHeadOptions:
    """What `add_fused_lm_head` was called with: logits are divided by `temperature`; `outputs` names the per-token
    fields to compute (log_probs always)."""

    temperature: float = 1.0
    outputs: tuple[str, ...] = ("log_probs",)


def trl_fused_head_options(forward: object) -> FusedHeadOptions | None:
    """The options of `forward` if it is the method TRL's `add_fused_lm_head` installs (its code object is named
    `_fused_forward` and lives in the trl package), read from its closure; None for anything else (accelerate's
    hooks, a user's wrapper: those are installed as usual)."""
    function = getattr(forward, "__func__", forward)
    code = getattr(function, "__code__", None)
    if code is None or code.co_name != "_fused_forward" or "trl" not in Path(code.co_filename).parts:
        return None
    try:
        captured = inspect.getclosurevars(function).nonlocals
    except (TypeError, ValueError):
        return None
    if "temperature" not in captured:
        return None
    outputs = tuple(captured.get("outputs") or ("log_probs",))
    unknown = sorted(set(outputs) - set(PER_TOKEN_FIELDS))
    if unknown:
        raise ValueError(f"add_fused_lm_head(outputs={outputs!r}): hf_moe's fused LM head knows {PER_TOKEN_FIELDS}, "
                         f"not {unknown}.")
    logger.info("hf_moe: TRL's fused LM head is served by MoEForCausalLM.forward(fused_lm_head=True), so the MTP "
                "and balance losses stay in the objective (temperature %s).", captured["temperature"])
    return FusedHeadOptions(temperature=float(captured["temperature"]), outputs=outputs)


@dataclass
class FusedLMHeadOutput(ModelOutput):
    """TRL's `FusedCausalLMOutput` fields, plus hf_moe's loss parts (see the module docstring)."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


def fused_head_output(
    logits: torch.Tensor, labels: torch.Tensor, shift_labels: torch.Tensor | None, options: FusedHeadOptions,
    lm_loss: torch.Tensor | None, mtp_loss: torch.Tensor | None, balance_loss: torch.Tensor | None,
) -> FusedLMHeadOutput:
    """TRL's per-token fields of the next-token distribution softmax(logits / T): positions 0..T-2 scored against
    labels[1:] (or every position against `shift_labels`), zero where the target is -100."""
    if shift_labels is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    targets = targets.to(logits.device)
    mask = targets != IGNORE_INDEX  # (B, T')
    scaled = logits.float() / options.temperature  # (B, T', V)
    log_p = scaled.log_softmax(dim=-1)
    fields: dict[str, torch.Tensor | None] = dict.fromkeys(PER_TOKEN_FIELDS)
    fields["log_probs"] = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    if "entropy" in options.outputs:
        fields["entropy"] = -(log_p.exp() * log_p).sum(dim=-1).masked_fill(~mask, 0.0)
    with torch.no_grad():
        if "log_sum_sq_probs" in options.outputs:
            fields["log_sum_sq_probs"] = torch.logsumexp(2 * log_p, dim=-1).masked_fill(~mask, 0.0)
        if "mean_logits" in options.outputs:
            fields["mean_logits"] = scaled.mean(dim=-1).masked_fill(~mask, 0.0)
        if "is_top1" in options.outputs:
            fields["is_top1"] = (scaled.argmax(dim=-1) == targets) & mask
    aux = scaled.new_zeros(())  # TRL adds coef * aux_loss unconditionally once enabled: never None
    for part in (mtp_loss, balance_loss):
        if part is not None:
            aux = aux + part
    nll = -fields["log_probs"].sum() / mask.sum().clamp(min=1)
    return FusedLMHeadOutput(loss=nll + aux, label_mask=mask, aux_loss=aux, lm_loss=lm_loss, mtp_loss=mtp_loss,
                             balance_loss=balance_loss, **fields)
