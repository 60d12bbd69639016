"""Self-speculative greedy decoding with the multi-token-prediction modules (DeepSeek-V3 §2.2, §5.4.3).

Each round, the MTP modules draft D tokens from the main model's last hidden state, then ONE main-model
forward over [last token, d_1..d_D] verifies them: the main model's greedy choice g_j at each position is
computed anyway, the longest prefix of drafts with d_j == g_{j-1} is accepted, and g at the first mismatch
comes for free. Every emitted token is therefore a main-model greedy choice given the tokens before it, so
the output equals plain greedy decoding (up to floating-point differences between a D+1-token forward and
one-token forwards, which only matter at exact logit ties); the MTP modules only decide how many tokens one
main forward yields.

Bookkeeping (positions i; L tokens accepted; the main cache holds positions < L-1): MTP depth k at position
i reads h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1}. Its inputs are final (accepted) for i <= L-1-k,
so its cache keeps the first L-k positions and every round recomputes the rest. The hidden states h^k of
final positions that depth k+1 has not consumed yet are kept in `tails[k]`.
Masks come from `MoEModel.attention_mask_for`, the model's own construction: the main forwards build theirs
(one per attention type of `layer_types`), and each MTP block gets the mask of its own layer index and type
(`config.layer_type`: full attention past the last layer unless every layer slides), sized by its cache.

transformers' own `generate(use_mtp=True)` (MTPCandidateGenerator + modeling_layers.MtpModel) cannot drive
these modules: it rebuilds MTP layers as `MtpLayer(mtp_block=DecoderLayer(config, k))` expecting a block that
returns a tensor (ours returns hidden, routing, attention weights), a block whose kind follows layer index k
(ours is MoE whatever the index), and it reloads weights from `config.name_or_path` under other key names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import MoECache


@dataclass
class MTPGenerationOutput:
    """Tokens and draft statistics of `mtp_generate`."""

    sequences: torch.LongTensor  # (B, prompt + new)
    drafted: int = 0  # draft tokens proposed to the main model (rows x drafts, summed over rounds)
    accepted: int = 0  # of those, accepted
    main_forwards: int = 0  # main-model forwards after the prompt's
    new_tokens: int = 0  # tokens generated per row
    accepted_per_depth: list[int] = field(default_factory=list)  # rounds x rows where drafts 1..k were all accepted
    drafted_per_depth: list[int] = field(default_factory=list)
    rounds: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (tokens known L, drafts (B, depth))

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (DeepSeek-V3 reports 85-90% for its depth-1 module)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per main-model decoding forward (1.0 for plain greedy decoding)."""
        return (self.new_tokens - 1) / self.main_forwards if self.main_forwards else float("nan")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 2-D attention mask, as `generate()` makes them (padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _eos_list(eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def mtp_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    num_draft_tokens: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> MTPGenerationOutput:
    """Greedy decoding of `model` (an MoEForCausalLM with MTP modules) sped up by MTP self-speculation.

    input_ids (B, T) with optional left-padding `attention_mask`; drafts `num_draft_tokens` (default: the
    number of MTP modules, at most that) per round. Finished rows (eos) are filled with `pad_token_id` and
    decoding stops when all rows are finished or after `max_new_tokens`, like `generate(do_sample=False)`.
    """
    if getattr(model, "mtp", None) is None:
        raise ValueError("mtp_generate needs MTP modules: the model has config.num_nextn_predict_layers=0.")
    depth_max = len(model.mtp) if num_draft_tokens is None else int(num_draft_tokens)
    if not 0 <= depth_max <= len(model.mtp):
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} is invalid: allowed 0..{len(model.mtp)}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be >= 1.")
    eos = torch.tensor(_eos_list(eos_token_id), dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos.numel() else 0
    config, base, lm_head = model.config, model.model, model.head_logits  # argmax: logits_scaling kept anyway
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    tokens = input_ids
    main_cache, mtp_cache = MoECache(config=config), MoECache()
    main_cache.activate_past_recording()  # sliding/chunked layers must be croppable after rejected drafts
    result = MTPGenerationOutput(sequences=tokens, accepted_per_depth=[0] * depth_max, drafted_per_depth=[0] * depth_max)

    # prompt: the main model's hidden states h^0 and its first greedy token
    out = base(input_ids=tokens, attention_mask=mask, position_ids=_positions(mask), cache=main_cache, use_cache=True)
    greedy = lm_head(out.last_hidden_state[:, -1]).argmax(dim=-1, keepdim=True)  # (B, 1)
    unfinished = torch.ones(batch, dtype=torch.bool, device=tokens.device)
    new_ids, unfinished = _finish(greedy, unfinished, eos, pad_token_id)
    tokens, mask = torch.cat((tokens, new_ids), dim=1), torch.cat((mask, mask.new_ones(batch, 1)), dim=1)
    generated = 1
    num_modules = len(model.mtp)
    cached = [0] * (num_modules + 2)  # cached[k]: positions (all final) in depth k's cache; [0], [D+1] unused
    hist = [out.last_hidden_state] + [out.last_hidden_state[:, :0]] * num_modules
    # hist[0]: h^0 at positions [cached[1], L-1); hist[k]: final h^k at [cached[k+1], cached[k]) not yet consumed

    while generated < max_new_tokens and unfinished.any():
        length = tokens.shape[1]  # L
        depth = min(depth_max, max_new_tokens - generated - 1)
        positions = _positions(mask)
        drafts: list[torch.Tensor] = []
        available = [(hist[0], cached[1])]  # (h^k, first position) covering [first, L-1), per depth k
        final = list(cached)
        for k in range(1, depth + 1):
            module, start = model.mtp[k - 1], cached[k]
            previous, _ = available[k - 1]  # h^{k-1} at positions [start, L-1)
            known = torch.cat([tokens, *drafts], dim=1)
            embeds = base.embed_tokens(known[:, start + k:length - 1 + k])  # Emb(t_{i+k}) for i in [start, L-1)
            position_ids = positions[:, start:length - 1]
            layer_idx = module.block.self_attn.layer_idx
            causal = base.attention_mask_for(embeds, mask[:, :length - 1], mtp_cache, position_ids, layer_idx)
            hidden, _ = module(previous, embeds, causal, base.rotary_emb(embeds, position_ids), cache=mtp_cache)
            drafts.append(lm_head(module.norm(hidden[:, -1])).argmax(dim=-1, keepdim=True))  # t_{L+k-1}
            final[k] = max(length - k, 0)  # inputs are accepted tokens up to position L-1-k
            mtp_cache.layers[layer_idx].crop(-(length - 1 - final[k]))
            available.append((torch.cat((hist[k], hidden), dim=1), cached[k + 1]))
        for k, (states, first) in enumerate(available):  # keep the final h^k that depth k+1 has not consumed
            if k < num_modules:
                high = length - 1 if k == 0 else final[k]
                hist[k] = states[:, final[k + 1] - first:high - first]
        cached = final

        result.rounds.append((length, torch.cat([tokens[:, :0], *drafts], dim=1)))
        # one main forward verifies [t_{L-1}, d_1..d_depth]
        verify = torch.cat([tokens[:, -1:], *drafts], dim=1)  # (B, depth + 1)
        verify_mask = torch.cat((mask, mask.new_ones(batch, depth)), dim=1)
        out = base(input_ids=verify, attention_mask=verify_mask, position_ids=_positions(verify_mask)[:, length - 1:],
                   cache=main_cache, use_cache=True)
        result.main_forwards += 1
        greedy = lm_head(out.last_hidden_state).argmax(dim=-1)  # (B, depth + 1): main choices for t_L..t_{L+depth}
        if depth:
            matches = (torch.cat(drafts, dim=1) == greedy[:, :depth]).long().cumprod(dim=1)  # (B, depth)
            accepted_rows = matches.sum(dim=1)
            live = unfinished.sum().item()
            result.drafted += depth * live
            result.accepted += accepted_rows[unfinished].sum().item()
            for j in range(depth):
                result.drafted_per_depth[j] += live
                result.accepted_per_depth[j] += matches[unfinished, j].sum().item()
            accepted = int(accepted_rows[unfinished].min())
        else:
            accepted = 0
        count = min(accepted + 1, max_new_tokens - generated)
        new_ids, unfinished = _finish(greedy[:, :count], unfinished, eos, pad_token_id)
        count = new_ids.shape[1]
        tokens = torch.cat((tokens, new_ids), dim=1)
        mask = torch.cat((mask, mask.new_ones(batch, count)), dim=1)
        generated += count
        main_cache.crop(-(depth + 1 - count))
        hist[0] = torch.cat((hist[0], out.last_hidden_state[:, :count]), dim=1)  # + h^0 at [L-1, L+count-1)

    result.sequences, result.new_tokens = tokens, generated
    return result


def _finish(
    new_ids: torch.Tensor, unfinished: torch.Tensor, eos: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """generate()'s end-of-sequence rule, token by token: rows already finished get `pad_token_id`. Returns
    the kept tokens (cut right after the token that finishes the last row) and the rows still unfinished."""
    columns = []
    unfinished = unfinished.clone()
    for j in range(new_ids.shape[1]):
        columns.append(torch.where(unfinished, new_ids[:, j], torch.full_like(new_ids[:, j], pad_token_id)))
        if eos.numel():
            unfinished &= ~torch.isin(columns[-1], eos)
            if not unfinished.any():
                break
    return torch.stack(columns, dim=1), unfinished
