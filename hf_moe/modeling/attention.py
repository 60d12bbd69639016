"""Attention: multi-head latent attention (MLA, DeepSeek-V2 §2.1) and grouped-query attention (GQA).

Both run through transformers' attention interface (`config._attn_implementation`) and its Cache API: a name
transformers defines ("eager", "sdpa", "flash_attention_2", "flex_attention", ...) means exactly what it means
there. hf_moe's default (`attn_implementation=None` or "auto", see `default_attention`) is "hf_moe_sdpa" once
`import hf_moe` has registered it: sdpa's semantics with CPU kernels where they win, and, for MLA, the
"mla_attention" kernel over the token-major projections. Rotary position embeddings come from rotary.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration import MoEConfig
from .kernel_hooks import plain_linear, project, run_kernel
from .normalization import RMSNorm
from .rotary import apply_rope

logger = logging.getLogger(__name__)

HF_MOE_ATTENTION = "hf_moe_sdpa"  # the name hf_moe.kernels registers in transformers' attention interface
_logged_defaults: set[tuple[str | None, str | None]] = set()


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN attention temperature factor 0.1 * mscale * ln(s) + 1 (Peng et al. 2023; DeepSeek-V2 App. B)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: MoEConfig) -> float:
    """qk_head_dim^-0.5, times mscale^2 when YaRN with `mscale_all_dim` is configured (DeepSeek-V2/V3); muP's
    `attention_multiplier` instead where one is set (Granite)."""
    if config.attention_multiplier is not None:
        return config.attention_multiplier
    scale = config.qk_head_dim ** -0.5
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return scale


def repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, T, d) -> (B, kv_heads * n_rep, T, d)."""
    if n_rep == 1:
        return states
    batch, kv_heads, length, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, n_rep, length, dim).reshape(batch, kv_heads * n_rep, length, dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling + mask) v, probabilities in fp32. Returns (B, T, heads, dv) and the weights."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, heads, T, S)
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, heads, dv)
    return output, weights


def sink_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    s_aux: torch.Tensor | None = None,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with a learned sink logit per head (gpt-oss): the softmax runs over [q k^T; s_h], the
    sink's share is dropped, so a head may attend to nothing. Returns (B, T, heads, dv) and the weights.
    Takes the mask of any eager or sdpa-style implementation (`additive_mask`)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, heads, T, S)
    logits = logits + additive_mask(attention_mask, logits)
    sinks = s_aux.to(logits.dtype).reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    combined = torch.cat((logits, sinks), dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    weights = nn.functional.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    weights = nn.functional.dropout(weights, p=dropout, training=module.training).to(value.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, heads, dv)
    return output, weights


def additive_mask(attention_mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """The mask to add to logits (B, heads, T, S): an eager (additive) mask as it is; an sdpa-style boolean one
    (True: attend) as 0 / -inf; none (sdpa's causal skip, taken only without padding) as the causal mask of
    the last T of S positions."""
    length, total = logits.shape[-2:]
    if attention_mask is None:
        rows = torch.arange(total - length, total, device=logits.device).view(-1, 1)
        allowed = torch.arange(total, device=logits.device).view(1, -1) <= rows
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[:, :, :, :total]
    else:
        return attention_mask[:, :, :, :total].to(logits.dtype)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.where(allowed, zero, torch.finfo(logits.dtype).min)


#: attention implementations of transformers that take sinks (`s_aux`); any other runs `sink_attention_forward`
SINK_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flex_attention")


def sink_attention_function(config: MoEConfig) -> Callable:
    """The attention function for heads with sinks: transformers' where it takes `s_aux`, else ours."""
    if config._attn_implementation in SINK_IMPLEMENTATIONS:
        return attention_function(config)
    return sink_attention_forward


def default_attention(requested: str | None) -> str | None:
    """`attn_implementation` as hf_moe models resolve it: None and "auto" mean "hf_moe_sdpa" where it is
    registered (`import hf_moe`), else None (transformers' default: sdpa, or eager where sdpa cannot run); any
    other name is returned as given. Each automatic choice is logged once per process."""
    if requested not in (None, "auto"):
        return requested
    choice = HF_MOE_ATTENTION if HF_MOE_ATTENTION in ALL_ATTENTION_FUNCTIONS.valid_keys() else None
    if (requested, choice) not in _logged_defaults:
        _logged_defaults.add((requested, choice))
        logger.info("hf_moe attention: attn_implementation=%r -> %r%s", requested, choice or "sdpa (transformers' default)",
                    " (torch's sdpa with hf_moe's CPU kernels where they win)" if choice else "")
    return choice


def cached_length(cache: object, layer_idx: int) -> int | torch.Tensor | None:
    """Tokens a cache layer holds before this step: an int (dynamic caches), a 0-d tensor (static caches once
    filled; never read on the host here), or None for caches without lengths (continuous batching's paged cache)."""
    get_seq_length = getattr(cache, "get_seq_length", None)
    return None if get_seq_length is None else get_seq_length(layer_idx)


def attention_function(config: MoEConfig) -> Callable:
    """The configured function of transformers' attention interface (our eager one for "eager")."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2 eqs. 9-19): keys/values come from a shared latent c_kv (kv_lora_rank) and a decoupled,
    shared rotary key k_pe; only [c_kv, k_pe] are cached. Queries are optionally low-rank too (q_lora_rank)."""

    def __init__(self, config: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.scaling = softmax_scale(config)
        hidden = config.hidden_size
        latent_eps = config.rms_norm_eps if config.latent_norm_eps is None else config.latent_norm_eps
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * self.qk_head_dim, bias=config.attention_bias)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=latent_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=latent_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, hidden, bias=config.attention_out_bias)
        # Decoding with weight absorption (see `absorbed_attention`) costs ~T*S*(2r + dr) per head against
        # S*r*(dn + dv) + T*S*(dn + dr + dv) for re-expanding the cache: absorb while T is below the crossover.
        r, dn, dv = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        self.absorb_max_query_len = r * (dn + dv) // max(2 * r - dn - dv, 1)
        self.absorb = True  # set False to force the expanded form (tests, benchmarks)

    def project_queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, heads, T, qk_head_dim)."""
        batch, length = hidden_states.shape[:2]
        if self.q_lora_rank is None:
            q = project(self.q_proj, hidden_states)
        else:
            q = project(self.q_b_proj, self.q_a_layernorm(project(self.q_a_proj, hidden_states)))
        return q.view(batch, length, self.num_heads, self.qk_head_dim).transpose(1, 2)

    def compress_kv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) -> latent c_kv (B, 1, T, kv_lora_rank) and un-rotated k_pe (B, 1, T, rope_dim)."""
        batch, length = hidden_states.shape[:2]
        latent, k_pe = project(self.kv_a_proj_with_mqa, hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent)
        return latent.view(batch, 1, length, self.kv_lora_rank), k_pe.view(batch, 1, length, self.qk_rope_head_dim)

    def expand_kv(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, 1, S, r) and rotated k_pe (B, 1, S, dr) -> keys (B, heads, S, dn+dr), values (B, heads, S, dv)."""
        batch, _, length, _ = latent.shape
        kv = project(self.kv_b_proj, latent).view(batch, length, self.num_heads, -1).transpose(1, 2)
        k_nope, values = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        keys = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return keys, values

    def use_absorption(self, length: int, past_length: int | torch.Tensor | None, attention_mask: object) -> bool:
        """Decode steps absorb: a cache holding earlier tokens (so prefill stays expanded), a query shorter than
        the crossover length, a plain Linear kv_b_proj (not LoRA-wrapped or quantized), no attention dropout,
        and a 4-D mask or none. `past_length` as `cached_length` gives it: a tensor (a static cache's length after
        its first update) counts as holding tokens without being read (no host sync under torch.compile); None
        (the paged cache of continuous batching) keeps the expanded form, through its paged attention function."""
        if past_length is None:
            return False
        return (
            self.absorb
            and (isinstance(past_length, torch.Tensor) or past_length > 0)
            and length <= self.absorb_max_query_len
            and plain_linear(self.kv_b_proj)
            and not (self.training and self.attention_dropout > 0)
            and (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4))
        )

    def absorbed_attention(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MLA over the cached latent without expanding it (DeepSeek-V3 inference "absorb", vLLM's MLA).

        With W_UK (heads, dn, r) and W_UV (heads, dv, r) the key and value parts of kv_b_proj:
            score_{h,s} = scale * ((W_UK,h^T q_nope,h) . c_s + q_pe,h . k_pe,s)
            o_h         = W_UV,h (sum_s p_{h,s} c_s)
        q_nope/q_pe (B, heads, T, dn/dr), latent (B, 1, S, r), rotated k_pe (B, 1, S, dr), mask additive or bool
        (B, 1, T, >=S). Returns (B, T, heads, dv) and the probabilities (B, heads, T, S).
        """
        batch, heads, length, _ = q_nope.shape
        kv_length, rank, nope = latent.shape[2], self.kv_lora_rank, self.qk_nope_head_dim
        w_kv = self.kv_b_proj.weight.view(heads, nope + self.v_head_dim, rank)  # W_UK rows, then W_UV rows
        q_latent = torch.bmm(q_nope.transpose(0, 1).reshape(heads, batch * length, nope), w_kv[:, :nope])
        q_latent = q_latent.view(heads, batch, length, rank).transpose(0, 1).reshape(batch, heads * length, rank)
        latent = latent.squeeze(1)  # (B, S, r)
        scores = torch.bmm(q_pe.reshape(batch, heads * length, -1), k_pe.squeeze(1).transpose(1, 2))  # (B, h*T, S)
        scores = torch.baddbmm(scores, q_latent, latent.transpose(1, 2), beta=self.scaling, alpha=self.scaling)
        scores = scores.view(batch, heads, length, kv_length)
        if attention_mask is None and length > 1:  # causal within the new tokens, aligned to the cache's end
            rows = torch.arange(length, device=scores.device)[:, None] + (kv_length - length)
            attention_mask = (torch.arange(kv_length, device=scores.device) <= rows)[None, None]
        if attention_mask is not None:
            mask = attention_mask[:, :, :, :kv_length]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        if scores.dtype == torch.float32:
            probs = scores.softmax(dim=-1)
        else:
            probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)
        out_latent = torch.bmm(probs.view(batch, heads * length, kv_length), latent)  # (B, h*T, r)
        out_latent = out_latent.view(batch, heads, length, rank).transpose(0, 1).reshape(heads, batch * length, rank)
        output = torch.bmm(out_latent, w_kv[:, nope:].transpose(1, 2))  # (h, B*T, dv)
        return output.view(heads, batch, length, -1).permute(1, 2, 0, 3), probs

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = hidden_states.shape[:2]
        cos, sin = position_embeddings
        interleaved = self.config.rope_interleave
        queries = self.project_queries(hidden_states)  # (B, h, T, dn + dr), rotary part not yet rotated
        latent, k_pe = self.compress_kv(hidden_states)
        k_pe = apply_rope(k_pe, cos, sin, interleaved)
        past_length = 0
        if cache is not None:  # the cache holds the latent and the rotated shared key only
            past_length = cached_length(cache, self.layer_idx)
            latent, k_pe = cache.update(latent, k_pe, self.layer_idx, kwargs=kwargs)  # kwargs: the paged cache's
        dropout = self.attention_dropout if self.training else 0.0
        if self.use_absorption(length, past_length, attention_mask):
            q_nope, q_pe = queries.split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
            output, weights = self.absorbed_attention(q_nope, apply_rope(q_pe, cos, sin, interleaved), latent, k_pe,
                                                      attention_mask)
        elif (output := run_kernel("mla_attention", self, queries, latent, k_pe, position_embeddings, attention_mask,
                                   dropout, **kwargs)) is not None:
            weights = None  # token-major kernel: no split/concat/transpose copies of queries, keys, values, output
        else:  # expanded keys/values through the configured attention backend
            q_nope, q_pe = queries.split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
            keys, values = self.expand_kv(latent, k_pe)
            queries = torch.cat((q_nope, apply_rope(q_pe, cos, sin, interleaved)), dim=-1)
            output, weights = attention_function(self.config)(
                self, queries, keys, values, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        return project(self.o_proj, output.reshape(batch, length, -1)), weights


class WeightlessRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) in fp32, cast back: an RMSNorm without a learned weight (Llama 4's q/k L2
    norm, `qk_norm_weight=False`)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).type_as(hidden_states)


def temperature_scales(config: MoEConfig, past_length: int | torch.Tensor, length: int,
                       device: torch.device) -> torch.Tensor:
    """Attention temperature tuning (Llama 4's NoPE layers; Scalable-Softmax, Nakanishi 2025, arXiv 2501.19399):
    1 + s * ln(1 + floor((t + 1) / f)) per query, t = past_length + 0..length-1 the token's index in the sequence,
    s = `attention_temperature_scale`, f = `attention_temperature_floor`. Returns (length,) fp32 factors."""
    positions = torch.arange(length, device=device) + past_length
    steps = torch.floor((positions.float() + 1.0) / config.attention_temperature_floor)
    return torch.log1p(steps) * config.attention_temperature_scale + 1.0


def qk_norm_module(config: MoEConfig, width: int) -> nn.Module:
    """The query or key norm over `width` dims: RMSNorm, or weightless where `qk_norm_weight` is False."""
    if config.qk_norm_weight:
        return RMSNorm(width, eps=config.rms_norm_eps)
    return WeightlessRMSNorm(eps=config.rms_norm_eps)


class GroupedQueryAttention(nn.Module):
    """GQA (Ainslie et al. 2023) as in Llama/Mistral/Qwen, with optional q/k RMSNorm ("head": Qwen3, "full":
    OLMoE; before RoPE, or after it as in Hunyuan; weighted or weightless), qkv clipping (OLMoE), partial rotary
    (GLM), per-layer sliding windows / chunks / NoPE (`config.layer_types`, `config.nope_layers`; Llama 4: q/k
    norm on the rotating layers only, temperature tuning on the NoPE ones), muP's attention multiplier (Granite)
    and learned attention sinks (gpt-oss)."""

    def __init__(self, config: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        multiplier = config.attention_multiplier  # muP (Granite); else 1/sqrt(d), as Llama/Qwen
        self.scaling = self.head_dim ** -0.5 if multiplier is None else multiplier
        self.attention_dropout = config.attention_dropout
        self.attention_type = config.layer_type(layer_idx)
        self.sliding_window = config.sliding_window if self.attention_type == "sliding_attention" else None
        self.use_rope = config.uses_rope(layer_idx)
        # Llama 4: the q/k norm only where the layer rotates; the temperature only where it does not
        self.use_qk_norm = config.qk_norm is not None and (self.use_rope or not config.qk_norm_skip_nope)
        self.use_temperature = config.attention_temperature_scale is not None and not self.use_rope
        self.is_causal = True
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_out_bias)
        if config.attention_sinks:  # only then an attribute: transformers' paged attention tests hasattr(m, "sinks")
            self.sinks = nn.Parameter(torch.zeros(self.num_heads))
        if self.use_qk_norm and config.qk_norm == "head":
            self.q_norm = qk_norm_module(config, self.head_dim)
            self.k_norm = qk_norm_module(config, self.head_dim)
        elif self.use_qk_norm and config.qk_norm == "full":
            self.q_norm = qk_norm_module(config, self.num_heads * self.head_dim)
            self.k_norm = qk_norm_module(config, self.num_kv_heads * self.head_dim)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, heads, T, d), k (B, kv_heads, T, d) through the q/k norms, per head or over all heads."""
        if self.config.qk_norm == "head":
            return self.q_norm(q), self.k_norm(k)
        batch, _, length, _ = q.shape  # "full": over the whole projection, (B, T, heads * d)
        q = self.q_norm(q.transpose(1, 2).reshape(batch, length, -1))
        k = self.k_norm(k.transpose(1, 2).reshape(batch, length, -1))
        return (q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2),
                k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = hidden_states.shape[:2]
        config = self.config
        before_rope = self.use_qk_norm and not config.qk_norm_after_rope
        q, k, v = (project(proj, hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if before_rope and config.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if config.clip_qkv is not None:
            clip = config.clip_qkv
            q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        if before_rope and config.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, d)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = position_embeddings
            q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        if self.use_qk_norm and config.qk_norm_after_rope:
            q, k = self.normalize_qk(q, k)
        if self.use_temperature:
            past = 0 if cache is None else cached_length(cache, self.layer_idx)
            if past is None:
                raise NotImplementedError("attention_temperature_scale needs the cache's length, which continuous "
                                          "batching's paged cache does not give")
            scales = temperature_scales(config, past, length, q.device).view(1, 1, length, 1)
            q = (q * scales).to(q.dtype)
        if cache is not None:  # kwargs: what the paged cache of continuous batching reads (and fills in)
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        sinks = getattr(self, "sinks", None)
        if sinks is not None:
            kwargs["s_aux"] = sinks
        attend = attention_function(config) if sinks is None else sink_attention_function(config)
        output, weights = attend(
            self, q, k, v, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
            sliding_window=self.sliding_window, **kwargs,
        )
        return project(self.o_proj, output.reshape(batch, length, -1)), weights


def build_attention(config: MoEConfig, layer_idx: int) -> nn.Module:
    if config.moa_experts:  # JetMoE's mixture of attention heads (modeling/moa.py)
        from .moa import MixtureOfAttentionHeads

        return MixtureOfAttentionHeads(config, layer_idx)
    if config.attention_type == "mla":
        return MultiHeadLatentAttention(config, layer_idx)
    return GroupedQueryAttention(config, layer_idx)
