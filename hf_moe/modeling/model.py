"""MoEPreTrainedModel, MoEModel, MoEForCausalLM, MoEForSequenceClassification."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg

from .attention import HF_MOE_ATTENTION, GroupedQueryAttention, default_attention
from .cache import MoECache, use_growable_layers
from .configuration import MoEConfig
from .decoder import DecoderLayer
from .experts import RoutedExperts
from .fused_head import FusedHeadOptions, FusedLMHeadOutput, fused_head_output, trl_fused_head_options
from .inputs import check_inputs
from .kernel_hooks import get_kernel, run_kernel
from .losses import IGNORE_INDEX, balance_coefficients, causal_lm_loss, moe_auxiliary_loss, total_loss
from .moa import MixtureOfAttentionHeads
from .moe import MoEBlock
from .mtp import MTPModule, shift_left
from .normalization import build_norm
from .rotary import RotaryEmbedding
from .router_types import HashRouter
from .routing import Router, RouterOutput, valid_tokens
from .routing_inputs import layer_routing_inputs
from .speculative import MTPGenerationOutput, mtp_generate


@dataclass
class MoEModelOutputWithPast(MoeModelOutputWithPast):
    """MoeModelOutputWithPast plus the summed auxiliary balance loss and each MoE layer's router decision."""

    aux_loss: torch.Tensor | None = None
    routings: tuple[RouterOutput, ...] | None = None


@dataclass
class MoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """MoeCausalLMOutputWithPast plus `mtp_loss` (already weighted by `mtp_loss_weight`, included in `loss`)
    and `lm_loss` (the next-token cross-entropy alone)."""

    mtp_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    routings: tuple[RouterOutput, ...] | None = None


def _name_keys(keys: set[str], limit: int = 20) -> str:
    """Sorted keys for an error message: the first `limit`, then how many more."""
    names = sorted(keys)
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def resolve_flags(config: MoEConfig, **flags: bool | None) -> tuple[bool, ...]:
    """Each forward flag (`use_cache`, `output_attentions`, `return_dict`...) in the given order: the value passed,
    or the config's when None (transformers' convention)."""
    return tuple(bool(getattr(config, name)) if value is None else bool(value) for name, value in flags.items())


class MoEPreTrainedModel(PreTrainedModel):
    config_class = MoEConfig
    config: MoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # the decode step compiles with fullgraph=True (Inductor on CPU, tests/modeling/test_compile.py): static cache,
    # MLA absorbed over the static latent buffer, experts and routing without host syncs under tracing
    _can_compile_fullgraph = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "mlp.gate.weight"]

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """Our experts class carries `@use_experts_implementation` (experts.py), not this module's source."""
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """None (the default) and "auto" mean hf_moe's per-device choice "hf_moe_auto" when `hf_moe.kernels`
        has registered it (`import hf_moe` does), else transformers' default (grouped_mm, or eager)."""
        if requested_experts in (None, "auto"):
            requested_experts = "hf_moe_auto" if "hf_moe_auto" in ALL_EXPERTS_FUNCTIONS else None
        return super().get_correct_experts_implementation(requested_experts)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """None (the default) and "auto" mean hf_moe's choice "hf_moe_sdpa" when `import hf_moe` has registered it
        (`attention.default_attention`), else transformers' default; every other name means what it means there."""
        chosen = default_attention(requested_attention)
        if chosen is not None and chosen != requested_attention:  # our default: fall back like transformers' own
            try:
                return super().get_correct_attn_implementation(chosen, is_init_check)
            except (ValueError, ImportError):
                chosen = None
        return super().get_correct_attn_implementation(chosen, is_init_check)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.tokens_per_expert)
            init.zeros_(module.balance_counts)
            if isinstance(module, HashRouter):
                init.copy_(module.hash_table, module.default_table())
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RoutedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            if module.gate_up_proj_bias is not None:
                init.zeros_(module.gate_up_proj_bias)
                init.zeros_(module.down_proj_bias)
        elif isinstance(module, MixtureOfAttentionHeads):
            init.normal_(module.q_proj, mean=0.0, std=std)
            init.normal_(module.o_proj, mean=0.0, std=std)
            if module.o_bias is not None:
                init.zeros_(module.o_bias)
        elif isinstance(module, MoEBlock) and module.bias is not None:
            init.zeros_(module.bias)
        elif isinstance(module, GroupedQueryAttention) and hasattr(module, "sinks"):
            init.zeros_(module.sinks)  # learned sink logits (gpt-oss): 0 = one extra unit of softmax mass

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: object) -> None:
        """Non-reentrant checkpointing by default. `use_reentrant=True` is allowed where the routers' side outputs
        are not trained on: no bias balancing counts expert loads (`router_bias_update_rate == 0`) and no balance
        loss reads the router logits (every coefficient of `losses.balance_coefficients` 0), or no MoE layer. Under
        reentrant checkpointing the first forward runs without grad and the recompute inside backward, so the load
        counters would see no token and the balance losses (computed from the layer's RouterOutput, which is not a
        checkpointed tensor output) would have no gradient."""
        gradient_checkpointing_kwargs = dict(gradient_checkpointing_kwargs or {})
        if gradient_checkpointing_kwargs.get("use_reentrant", False):
            reason = self.reentrant_checkpointing_conflict()
            if reason is not None:
                raise ValueError(
                    f"gradient_checkpointing_kwargs={{'use_reentrant': True}} cannot be used here: {reason}. "
                    "Reentrant checkpointing hides the first forward from grad and recomputes inside backward. Use "
                    "use_reentrant=False (the default).")
        gradient_checkpointing_kwargs.setdefault("use_reentrant", False)
        self._activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def reentrant_checkpointing_conflict(self) -> str | None:
        """Why reentrant checkpointing would train this model wrongly, or None where it is safe."""
        if not any(isinstance(m, Router) for m in self.modules()):
            return None
        if self.counts_expert_loads():
            return (f"bias balancing counts expert loads (router_bias_update_rate="
                    f"{self.config.router_bias_update_rate}), which would count no token")
        if any(balance_coefficients(self.config)):
            return "a balance loss (aux/device/seq/comm loss or z-loss) is on, and would get no gradient"
        return None

    def counts_expert_loads(self) -> bool:
        """Whether training counts tokens per expert for the bias update (some router, and a rate > 0)."""
        return self.config.router_bias_update_rate > 0 and any(isinstance(m, Router) for m in self.modules())

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *model_args: object,
        strict: bool | None = None,
        use_safetensors: bool | None = None,
        **kwargs: object,
    ) -> MoEPreTrainedModel | tuple[MoEPreTrainedModel, dict]:
        """`PreTrainedModel.from_pretrained`, made safe. Weights load from safetensors only (never pickle:
        `use_safetensors=False` raises).

        Strictness: a checkpoint saved by this same class (`config.architectures` names it, or names nothing) must
        match the model, so by default missing or unexpected weights raise a RuntimeError naming the keys (a
        silent partial load of one's own checkpoint is a bug, not a conversion). `strict=False` loads anyway
        (missing weights newly initialised, unexpected ones ignored), as does loading another class's checkpoint
        (e.g. a causal LM's into MoEForSequenceClassification). `output_loading_info=True` means the caller reads
        the report itself: it returns `(model, info)` as transformers does and raises only with `strict=True`.
        Without a checkpoint (`from_pretrained(None, config=..., state_dict=...)`) the weights are the caller's:
        not strict by default either."""
        if use_safetensors is False:
            raise ValueError(f"{cls.__name__}.from_pretrained(use_safetensors=False): hf_moe loads safetensors "
                             "checkpoints only; pickle-based .bin files can run code when loaded.")
        return_info = bool(kwargs.pop("output_loading_info", False))
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, use_safetensors=True,
                                              output_loading_info=True, **kwargs)
        if strict is None:
            same_class = cls.__name__ in (model.config.architectures or [cls.__name__])  # none recorded: strict
            strict = same_class and not return_info and pretrained_model_name_or_path is not None
        if strict and (info["missing_keys"] or info["unexpected_keys"]):
            raise RuntimeError(
                f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}): the checkpoint does not "
                f"match the model. Missing weights: {_name_keys(info['missing_keys'])}. Unexpected weights: "
                f"{_name_keys(info['unexpected_keys'])}. Pass strict=False to load anyway (missing weights are then "
                "newly initialised, unexpected ones ignored), or output_loading_info=True to get the report.")
        return (model, info) if return_info else model

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: object, remote_code: bool = True, **kwargs: object
    ) -> None:
        """`PreTrainedModel.save_pretrained`, plus (where `import hf_moe` registered the hooks) the modeling code and
        an `auto_map` in config.json ("remote_code" hook, `hf_moe.hub`; `remote_code=False` leaves them out), so the
        folder loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` in a process without
        hf_moe (lm-eval, vLLM, ...), and a model card (README.md: architecture, total/active parameters, routing,
        upcycling recipe) when the folder has none yet. As remote code without hf_moe, transformers copies the code
        itself and no card is written. The card is built before the weights are written, so a config the card cannot
        describe fails before anything is saved."""
        card_path = os.path.join(save_directory, "README.md")
        main = kwargs.get("is_main_process", True)
        card = None
        if main and not os.path.exists(card_path):
            card = run_kernel("model_card", self, remote_code=remote_code or "auto_map" in self.config.to_dict())
        super().save_pretrained(save_directory, *args, **kwargs)
        if main and remote_code:
            run_kernel("remote_code", save_directory)
        if card is not None and not os.path.exists(card_path):
            with open(card_path, "w", encoding="utf-8") as file:
                file.write(card)

    def push_to_hub(self, repo_id: str, **kwargs: object) -> object:
        """Upload through hf_moe's "push_to_hub" hook (`hf_moe.hub.push_to_hub`: safetensors shards, model card,
        modeling code so the repo loads with trust_remote_code); transformers' upload where it is not registered."""
        publish = get_kernel("push_to_hub")
        if publish is None:
            return super().push_to_hub(repo_id, **kwargs)
        return publish(self, repo_id, **kwargs)


class MoEModel(MoEPreTrainedModel):
    """Embeddings -> decoder layers (dense or MoE) -> final norm (RMSNorm or LayerNorm)."""

    def __init__(self, config: MoEConfig) -> None:
        config.validate_moe()  # fields may have changed since the config was built
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = build_norm(config)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def attention_mask_for(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None,
        position_ids: torch.Tensor, layer_idx: int | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """The 4-D (or backend-specific) causal mask, sliding-window when configured; with `layer_types` one mask
        per attention type the layers use, as a dict by type (each DecoderLayer takes its own), each sized by the
        cache layer of the first layer of its type (transformers' own default sizes sliding and chunked masks both
        by the first layer of either). `layer_idx`: the mask of that one layer (e.g. an MTP block decoding with its
        own cache), sized by its layer of `cache`; with `layer_types` a dict holding only that layer's type.
        A dict given as `attention_mask` is already that (transformers' continuous batching builds the masks of
        its paged cache by attention type) and is used as it is."""
        if isinstance(attention_mask, dict):
            return attention_mask
        kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                      position_ids=position_ids)  # fmt: skip
        if self.config.layer_types is None:
            make_mask = create_sliding_window_causal_mask if self.config.sliding_window else create_causal_mask
            return make_mask(**kwargs, layer_idx=layer_idx)
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask,
                  "chunked_attention": create_chunked_causal_mask}  # fmt: skip
        types = self.config.layer_types
        if layer_idx is not None:
            sized_by = {self.config.layer_type(layer_idx): layer_idx}
        else:
            sized_by = {kind: types.index(kind) if kind in types else None for kind in {*types, "full_attention"}}
        return {kind: makers[kind](**kwargs, layer_idx=index) for kind, index in sized_by.items()}

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        replay_routing: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        router_token_ids: torch.LongTensor | None = None,
        **kwargs: object,
    ) -> MoEModelOutputWithPast | tuple:
        """Every `output_*` / `use_cache` / `return_dict` left None follows the config, as in transformers' models;
        `return_dict=False` returns `to_tuple()` (the fields that are not None, in order).
        `replay_routing`: one (B, T, K) tensor of expert ids per MoE layer (routing replay; -1 = not recorded,
        the router chooses); `router_token_ids` (B, T): the token ids for hash routing when `inputs_embeds` is
        given (default: `input_ids`)."""
        check_inputs(self.config, input_ids, inputs_embeds, attention_mask)
        use_cache, output_hidden_states, output_attentions, output_router_logits, return_dict = resolve_flags(
            self.config, use_cache=use_cache, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, output_router_logits=output_router_logits, return_dict=return_dict)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = MoECache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:  # muP (Granite): embeddings scaled, input embeddings too
            inputs_embeds = inputs_embeds * self.config.embedding_multiplier
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        # only expert choice asks whether the forward extends a cache (it refuses to); the paged cache of continuous
        # batching has no get_seq_length, and other routers need not read (or host-sync on) the cache's length
        decoding = (self.config.router_type == "expert_choice" and cache is not None
                    and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0))  # fmt: skip
        routing_inputs = layer_routing_inputs(
            self.config, input_ids if router_token_ids is None else router_token_ids, replay_routing,
            tuple(inputs_embeds.shape[:2]), decoding=decoding)

        mask = self.attention_mask_for(inputs_embeds, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        prepared = isinstance(attention_mask, dict)  # masks by attention type, made by the caller: no padding mask
        valid = None if prepared else valid_tokens(attention_mask, inputs_embeds.shape[1])  # (B, T) or None: load
        token_mask = None if valid is None else valid.reshape(-1)
        hidden_states = inputs_embeds
        all_hidden, all_attn, routings = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, routing, attn_weights = layer(
                hidden_states, attention_mask=mask, position_embeddings=position_embeddings, cache=cache,
                use_cache=use_cache, token_mask=token_mask, routing_inputs=routing_inputs.get(layer.layer_idx),
                **kwargs,
            )
            if routing is not None:
                routings.append(routing)
            if output_attentions:
                all_attn.append(attn_weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        aux_loss = None
        if self.training or output_router_logits:
            aux_loss = moe_auxiliary_loss(routings, attention_mask, tuple(inputs_embeds.shape[:2]), self.config)
        output = MoEModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            router_logits=tuple(r.logits for r in routings) if output_router_logits else None,
            aux_loss=aux_loss,
            routings=tuple(routings),
        )
        return output if return_dict else output.to_tuple()


class MoEForCausalLM(MoEPreTrainedModel, GenerationMixin):
    """Causal LM head on MoEModel; optional multi-token-prediction modules (`mtp`) trained with the LM loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.model = MoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        depth = config.num_nextn_predict_layers
        self.mtp = nn.ModuleList([MTPModule(config, k) for k in range(depth)]) if depth else None
        self.fused_head_options = FusedHeadOptions()
        self.post_init()

    def __setattr__(self, name: str, value: object) -> None:
        """TRL's `add_fused_lm_head` replaces `forward` with one that skips this class's losses: keep ours, which
        serves `fused_lm_head=True` itself with the options TRL asked for (`fused_head.py`). Other wrappers of
        `forward` (accelerate's hooks, ...) are installed as usual."""
        options = trl_fused_head_options(value) if name == "forward" else None
        if options is not None:
            name, value = "fused_head_options", options
        super().__setattr__(name, value)

    @property
    def loss_function(self) -> Callable:
        """The LM loss: one set with `model.loss_function = fn` or a `loss_type` other than "ForCausalLM" is used
        as in transformers; by default `causal_lm_loss` (transformers' ForCausalLMLoss, or its kernels)."""
        if hasattr(self, "_loss_function"):
            return self._loss_function
        if getattr(self, "loss_type", None) in (None, "ForCausalLM"):
            return causal_lm_loss
        return super().loss_function

    @loss_function.setter
    def loss_function(self, value: Callable) -> None:
        self._loss_function = value

    def create_masks_for_generate(
        self, config: MoEConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None,
        position_ids: torch.Tensor | None = None, **kwargs: object,
    ) -> torch.Tensor | None:
        """generate()'s precomputed mask (static caches): the model's own single mask where every layer has one
        attention type; with `layer_types` the 2-D mask is left to the forward, which builds one mask per type
        (transformers' generic version reads `config.layer_types` as always a list)."""
        if config.layer_types is not None:
            return attention_mask
        return self.model.attention_mask_for(inputs_embeds, attention_mask, cache, position_ids)

    def _prepare_cache_for_generation(self, generation_config: object, model_kwargs: dict, *args: object) -> None:
        """The full-attention layers of generate()'s default DynamicCache append in place (`MoECache`'s layers);
        the cache object itself, and any cache the caller passes or `cache_implementation` asks for (static,
        offloaded, quantized...), stay as transformers made them."""
        if self.config.router_type == "expert_choice":
            raise ValueError("generate() is refused for router_type='expert_choice': expert choice is not causal "
                             "(each expert picks among all tokens of the batch), so it cannot decode token by token.")
        given = model_kwargs.get("cache")
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args)
        cache = model_kwargs.get("cache")
        if cache is not given and type(cache) is DynamicCache and not cache.offloading:
            use_growable_layers(cache)

    def init_continuous_batching(self, *args: object, **kwargs: object) -> object:
        """transformers' continuous-batching manager (`generate_batch`, `transformers serve`). It runs only sdpa,
        "paged|eager" or flash attention over its paged cache; hf_moe's default "hf_moe_sdpa" has sdpa's semantics,
        so the manager runs "sdpa" and switches back to "hf_moe_sdpa" when it stops, as it does for its own switches."""
        if self.config._attn_implementation != HF_MOE_ATTENTION:
            return super().init_continuous_batching(*args, **kwargs)
        self.set_attn_implementation("sdpa")
        try:
            manager = super().init_continuous_batching(*args, **kwargs)
        except BaseException:
            self.set_attn_implementation(HF_MOE_ATTENTION)
            raise
        if getattr(manager, "_original_attn_impl", None) is None:
            manager._original_attn_impl = HF_MOE_ATTENTION
        return manager

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: object,
    ) -> MoECausalLMOutputWithPast | FusedLMHeadOutput | tuple:
        """Decoder -> LM head (+ LM loss) -> MTP modules (+ MTP loss, training with labels only) -> total loss
        (`losses.total_loss`: LM + MTP + the balance terms of every router). `fused_lm_head=True` (TRL's trainers)
        returns TRL's per-token output instead, with the MTP and balance terms as its `aux_loss` (`fused_head.py`)."""
        fused = kwargs.pop("fused_lm_head", False)
        if fused and labels is None:
            raise ValueError("MoEForCausalLM.forward(fused_lm_head=True) needs labels (TRL's fused LM head scores them).")
        shift_labels = kwargs.get("shift_labels")
        check_inputs(self.config, input_ids, inputs_embeds, attention_mask, labels, shift_labels)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.model.embed_tokens(input_ids)  # the MTP modules read the embeddings too
        routing_kwargs = {"router_token_ids": kwargs.pop("router_token_ids", input_ids),  # hash routing reads them
                          "replay_routing": kwargs.pop("replay_routing", None)}
        outputs = self.model(
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            output_router_logits=output_router_logits, return_dict=True, **routing_kwargs, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        num_items = kwargs.get("num_items_in_batch")
        logits, lm_loss = self.logits_and_lm_loss(hidden_states, labels, logits_to_keep, **kwargs)
        mtp_loss, mtp_routings = None, []
        if labels is not None and self.mtp is not None and self.config.mtp_loss_weight > 0:
            mtp_loss, mtp_routings = self.multi_token_prediction_loss(
                hidden_states, inputs_embeds, labels, attention_mask, position_ids, num_items_in_batch=num_items,
                shift_labels=shift_labels)
        loss = total_loss(self.config, lm_loss, mtp_loss, outputs.aux_loss, mtp_routings, labels, num_items,
                          shift_labels=shift_labels)
        if fused:
            return fused_head_output(logits, labels, shift_labels, self.fused_head_options, loss.lm, loss.mtp, loss.aux)
        result = MoECausalLMOutputWithPast(
            loss=loss.total, aux_loss=loss.aux, logits=logits, cache=outputs.cache,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions, router_logits=outputs.router_logits,
            mtp_loss=loss.mtp, lm_loss=loss.lm, routings=(*(outputs.routings or ()), *(r for r, _ in mtp_routings)),
        )
        return result if return_dict else result.to_tuple()

    def head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """lm_head(h) / logits_scaling (muP, Granite; 1 elsewhere): the logits of the LM head and of every MTP depth."""
        logits = self.lm_head(hidden_states)
        scaling = self.config.logits_scaling
        return logits if scaling == 1.0 else logits / scaling

    def logits_and_lm_loss(
        self, hidden_states: torch.Tensor, labels: torch.Tensor | None, logits_to_keep: int | torch.Tensor,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's logits (of the last `logits_to_keep` positions, 0 = all, or those of an index tensor)
        and, given labels, the LM loss. The default loss may run with the head as the "lm_head_loss" kernel."""
        scaling = self.config.logits_scaling  # muP (Granite): logits / logits_scaling, which the fused kernel lacks
        if labels is not None and self.loss_function is causal_lm_loss and scaling == 1.0:
            fused = run_kernel("lm_head_loss", self.lm_head, hidden_states, labels, logits_to_keep,
                               num_items_in_batch=kwargs.get("num_items_in_batch"),
                               shift_labels=kwargs.get("shift_labels"))
            if fused is not None:
                lm_loss, logits = fused
                return logits, lm_loss
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.head_logits(hidden_states[:, keep, :])
        if labels is None:
            return logits, None
        return logits, self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

    def generate_with_mtp(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        num_draft_tokens: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> MTPGenerationOutput:
        """Greedy decoding sped up by self-speculation with the MTP modules (DeepSeek-V3 §2.2): the MTP modules
        draft, one main forward verifies; the tokens equal `generate(do_sample=False)`'s (see `speculative.py`).
        eos/pad default to `generation_config`. Returns the sequences and the draft acceptance statistics."""
        gen = self.generation_config
        return mtp_generate(
            self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            num_draft_tokens=num_draft_tokens, eos_token_id=gen.eos_token_id if eos_token_id is None else eos_token_id,
            pad_token_id=gen.pad_token_id if pad_token_id is None else pad_token_id,
        )

    def multi_token_prediction_loss(
        self,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[RouterOutput, torch.Tensor]]]:
        """lambda / D * sum_k CE_k (DeepSeek-V3 eq. 25): depth k reads tokens i+k and predicts t_{i+k+1}.
        Padding (attention_mask == 0) is never a target; `num_items_in_batch` normalises like the LM loss.
        `shift_labels` (already shifted: shift_labels[i] is the target of position i, as transformers' loss takes
        it, e.g. under context parallelism) replaces `labels` as the source of every depth's targets.
        Also returns each MTP block's routing with its valid positions (B, T) bool (`mtp_positions`)."""
        real = valid_tokens(attention_mask, labels.shape[1])
        if real is not None:
            labels = labels.masked_fill(~real, IGNORE_INDEX)
            if shift_labels is not None:  # shift_labels[i] is the token at i + 1
                shift_labels = shift_labels.masked_fill(~shift_left(real, 1, False), IGNORE_INDEX)
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
        mask = self.model.attention_mask_for(inputs_embeds, attention_mask, None, position_ids)
        position_embeddings = self.model.rotary_emb(inputs_embeds, position_ids)
        previous, routings, total = hidden_states, [], hidden_states.new_zeros((), dtype=torch.float32)
        for k, module in enumerate(self.mtp, start=1):
            if labels.shape[1] <= k + 1:
                break
            valid = mtp_positions(attention_mask, inputs_embeds, k)
            previous, routing = module(previous, shift_left(inputs_embeds, k, 0.0), mask, position_embeddings,
                                       token_mask=valid.reshape(-1))
            if routing is not None:
                routings.append((routing, valid))
            logits_k = self.head_logits(module.norm(previous))
            labels_k = shift_left(labels, k, IGNORE_INDEX)  # logits_k[i] is scored against labels[i + k + 1]
            extra = {} if shift_labels is None else {"shift_labels": shift_left(shift_labels, k, IGNORE_INDEX)}
            total = total + self.loss_function(logits=logits_k, labels=labels_k, vocab_size=self.config.vocab_size,
                                               num_items_in_batch=num_items_in_batch, **extra)
        return self.config.mtp_loss_weight / len(self.mtp) * total, routings


def mtp_positions(attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, T) bool: positions i whose MTP input at `depth` is a real token t_{i+depth} (not padding, not the
    filler past the end of the sequence)."""
    batch, length = inputs_embeds.shape[:2]
    real = valid_tokens(attention_mask, length)
    if real is None:
        real = torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)
    return shift_left(real, depth, False) & real


#: transformers' generic classification forward without its decorators (its return_dict handling is replaced below)
_generic_classification_forward = inspect.unwrap(GenericForSequenceClassification.forward)


class MoEForSequenceClassification(GenericForSequenceClassification, MoEPreTrainedModel):
    """Sequence classification head on MoEModel (last non-padding token)."""

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: object,
    ) -> SequenceClassifierOutputWithPast | tuple:
        """transformers' GenericForSequenceClassification forward; `return_dict` (None: the config's) shapes the
        head's output only, as the inner MoEModel always hands the head the dataclass it reads (with
        `config.return_dict=False` transformers' generic head would read a tuple and fail)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output = _generic_classification_forward(
            self, input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, return_dict=True, **kwargs)
        return output if return_dict else output.to_tuple()
