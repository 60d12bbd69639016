"""The causal-LM loss with transformers' `ForCausalLMLoss` semantics, computed without logits-sized temporaries.

    loss = scale * sum_{t valid} (logsumexp(z_t) - z_t[y_t]),   dz_t = scale * (softmax(z_t) - onehot(y_t))

scale = 1 / num_items_in_batch when given (Trainer's token-count normalisation over accumulation and ranks),
else 1 / (number of valid targets); targets equal to `ignore_index` contribute nothing.

Why: autograd's cross-entropy allocates the log-probabilities, a zero-filled gradient for the gather and the
log-softmax gradient, each as large as the logits (tokens x vocabulary); on CPU every fresh multi-megabyte
tensor is page-faulted in, which for a 4096-token vocabulary cost as much as the LM head's matmuls. Here the
logits are read in row chunks (all rows at once below `CHUNK_ELEMENTS`) through one scratch block per call
(`scratch.scratch`). `LinearCrossEntropyFunction` goes further when the model computes the loss itself: it
owns the LM-head matmul, so the logits' gradient is formed chunk by chunk in scratch and multiplied into the
hidden-state and weight gradients at once, never as a whole. The logits are still returned (and may feed
other losses: their gradient is added).

Two kernels, both for fp32 CPU calls that autograd records (elsewhere the model runs transformers'
`ForCausalLMLoss` on its LM head's logits): "causal_lm_loss" (`causal_lm_loss_kernel`, the logits-input loss:
MTP heads, `logits_to_keep`) and "lm_head_loss" (`lm_head_loss_kernel`, head and loss in one Function). Whether
the upstream gradient is non-negative is read once per backward (one host read, never per chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..eligible import eligible
from .gemm import addmm_into, mm, mm_into
from .scratch import scratch

CHUNK_ELEMENTS = 8 * 2**20  # logits per chunk (32 MB in fp32): the scratch block's size
MIN_CHUNK_ROWS = 256  # fewer rows would starve the chunked gradient matmuls (their inner dimension)


def chunks(rows: int, vocab: int) -> list[slice]:
    """Row slices of about `CHUNK_ELEMENTS` logits each (all rows at once for small vocabularies)."""
    step = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension of (N, V), chunk by chunk through one scratch block. Returns (N,)."""
    lse = logits.new_empty(logits.shape[0])
    row_chunks = chunks(*logits.shape)
    buffer = scratch((row_chunks[0].stop - row_chunks[0].start, logits.shape[1]), logits) if row_chunks else None
    for rows in row_chunks:
        block = logits[rows]
        row_max = block.amax(dim=-1, keepdim=True)  # (rows, 1)
        shifted = buffer[: block.shape[0]]  # this chunk's exp(z - max), dead after the sum
        torch.sub(block, row_max, out=shifted).exp_()
        torch.add(shifted.sum(dim=-1).log_(), row_max.squeeze(1), out=lse[rows])
    return lse


def summed_loss(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    return ((lse - logits.gather(1, targets[:, None]).squeeze(1)) * valid).sum() * scale


def logit_gradient_into(out: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor,
                        row_scale: torch.Tensor, nonnegative: bool) -> torch.Tensor:
    """out (rows, V) = row_scale * (softmax(logits) - onehot(targets)) for one chunk of rows. A non-negative
    scale s (`nonnegative`: every row's) goes into the exponent, exp(z - lse + log s) = s softmax(z) (s = 0
    gives exp(-inf) = 0): one pass over the logits fewer."""
    if nonnegative:
        torch.sub(logits, lse[:, None] - row_scale.log(), out=out).exp_()
        return out.scatter_add_(1, targets[:, None], -row_scale)
    torch.sub(logits, lse[:, None], out=out).exp_()
    out.scatter_add_(1, targets[:, None], torch.full_like(row_scale, -1.0))
    return out.mul_(row_scale)


def rows_scale(valid: torch.Tensor, scale: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, 1) factor of each row's gradient: scale * upstream gradient for valid rows, exactly 0 for ignored ones
    (also when no row is valid and scale = 1/0: the loss is NaN then, as transformers', its gradient is 0)."""
    return torch.where(valid, scale * grad_loss, 0.0).to(dtype)[:, None]


def prepare_targets(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets with ignored ones replaced by 0, bool mask of the valid ones)."""
    valid = targets != ignore_index
    return targets.masked_fill(~valid, 0), valid


class CrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of logits (N, V) against targets (N,), times `scale`; hand-written backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, targets: torch.Tensor,  # noqa: D102
                scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
        targets, valid = prepare_targets(targets, ignore_index)
        lse = row_logsumexp(logits)
        ctx.save_for_backward(logits, lse, targets, valid, scale)
        return summed_loss(logits, lse, targets, valid, scale)

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple:  # noqa: D102
        logits, lse, targets, valid, scale = ctx.saved_tensors
        row_scale = rows_scale(valid, scale, grad_loss, logits.dtype)
        nonnegative = bool((row_scale >= 0).all())  # once per backward
        grad = torch.empty_like(logits)
        for rows in chunks(*logits.shape):
            logit_gradient_into(grad[rows], logits[rows], lse[rows], targets[rows], row_scale[rows], nonnegative)
        return grad, None, None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(loss, logits) of the LM head z = h W^T and the summed cross-entropy times `scale`. Backward forms dz in
    row chunks (plus any gradient that reached the returned logits) and multiplies it straight into dh and dW."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
        scale: torch.Tensor, ignore_index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = mm(hidden, weight.t())  # (N, V)
        targets, valid = prepare_targets(targets, ignore_index)
        lse = row_logsumexp(logits)
        ctx.save_for_backward(hidden, weight, logits, lse, targets, valid, scale)
        ctx.set_materialize_grads(False)
        return summed_loss(logits, lse, targets, valid, scale), logits

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor | None,  # noqa: D102
                 grad_logits: torch.Tensor | None) -> tuple:
        hidden, weight, logits, lse, targets, valid, scale = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        row_scale = None if grad_loss is None else rows_scale(valid, scale, grad_loss, logits.dtype)
        nonnegative = row_scale is not None and bool((row_scale >= 0).all())  # once per backward
        row_chunks = chunks(*logits.shape)
        buffer = scratch((row_chunks[0].stop - row_chunks[0].start, logits.shape[1]), logits) if row_chunks else None
        for rows in row_chunks:
            block = buffer[: rows.stop - rows.start]  # dz for these rows, dead after the two products
            if row_scale is None:
                block.zero_()
            else:
                logit_gradient_into(block, logits[rows], lse[rows], targets[rows], row_scale[rows], nonnegative)
            if grad_logits is not None:
                block += grad_logits[rows]
            if need_hidden:
                mm_into(block, weight, grad_hidden[rows])
            if need_weight:
                if grad_weight is None:
                    grad_weight = mm(block.t(), hidden[rows])
                else:
                    addmm_into(grad_weight, block.t(), hidden[rows])
        return grad_hidden, grad_weight, None, None, None


def loss_scale(targets: torch.Tensor, num_items_in_batch: torch.Tensor | int | None, ignore_index: int,
               dtype: torch.dtype) -> torch.Tensor:
    """1 / num_items_in_batch, or 1 / (valid targets) when it is not given (a mean, as cross_entropy's)."""
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=targets.device)
    return 1.0 / denominator.to(dtype)


def next_token_targets(labels: torch.Tensor, ignore_index: int, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """labels (B, T) -> the flat target of every position, the next label (ignore_index for the last)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100, shift_labels: torch.Tensor | None = None, **_: object,
) -> torch.Tensor:
    """Next-token cross-entropy of logits (B, T, V) against labels (B, T) (shifted here unless `shift_labels`),
    with `CrossEntropyFunction`'s backward: transformers' ForCausalLMLoss semantics."""
    logits = logits.float().reshape(-1, vocab_size)
    targets = next_token_targets(labels, ignore_index, shift_labels).to(logits.device)
    scale = loss_scale(targets, num_items_in_batch, ignore_index, logits.dtype)
    return CrossEntropyFunction.apply(logits, targets, scale, ignore_index)


def causal_lm_loss_kernel(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                          **kwargs: object) -> torch.Tensor | None:
    """The "causal_lm_loss" kernel: `causal_lm_loss` for fp32 CPU logits that autograd records, else None."""
    return causal_lm_loss(logits, labels, vocab_size, **kwargs) if eligible(logits, training=True) else None


def lm_head_and_loss(
    hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal_lm_loss, logits (B, T, V)) of the LM head `weight` (V, H) on hidden_states (B, T, H), fp32."""
    batch, length, hidden = hidden_states.shape
    targets = next_token_targets(labels, ignore_index, shift_labels).to(hidden_states.device)
    scale = loss_scale(targets, num_items_in_batch, ignore_index, hidden_states.dtype)
    loss, logits = LinearCrossEntropyFunction.apply(hidden_states.reshape(-1, hidden), weight, targets, scale,
                                                    ignore_index)
    return loss, logits.view(batch, length, -1)


def lm_head_loss_kernel(
    lm_head: nn.Module, hidden_states: torch.Tensor, labels: torch.Tensor, logits_to_keep: int | torch.Tensor = 0,
    num_items_in_batch: torch.Tensor | int | None = None, shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The "lm_head_loss" kernel: (loss, logits) of a plain bias-free LM head and the default causal-LM loss
    over all positions (`logits_to_keep` 0) for an fp32 CPU call that autograd records, else None."""
    if (not isinstance(logits_to_keep, int) or logits_to_keep != 0
            or not eligible(hidden_states, lm_head.weight, training=True, modules=(lm_head,))):
        return None
    return lm_head_and_loss(hidden_states, lm_head.weight, labels, num_items_in_batch=num_items_in_batch,
                            shift_labels=shift_labels)
