"""Speed and memory of hf_moe against transformers' DeepseekV3ForCausalLM: same config, same weights, one process.

Parts (select with --parts): `moe` MoE layer forward+backward (ours vs transformers' grouped_mm and eager, and
a plain matmul for the FLOP/s ceiling), `train` training step forward+backward, `prefill` prompt tokens/s,
`decode` seconds per token at several context lengths (absorbed MLA vs transformers' re-expanded cache, and
our own expanded path), KV-cache bytes per token and peak memory; `generate` seconds per new token through
`generate()` itself, with and without the static cache + compiled decode step (generate_bench.py). Writes benchmarks/results/<name>.json and a
markdown table next to it.

    python benchmarks/run.py                              # everything: the issue's config, CPU fp32, ~5-8 min
    python benchmarks/run.py --parts moe,train --rounds 5
    python benchmarks/run.py --quick                      # smoke run: fewer rounds, shorter contexts
    python benchmarks/run.py --device cuda --dtype bfloat16 --config gpu --batch 4 --length 2048 --name gpu

On CUDA the training step also reports MFU (model FLOPs / time / the GPU's dense datasheet peak, see
gpu_bench.py), and decode its distance to the HBM bound (bytes a step must read / measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_bench import bench_generate  # noqa: E402
from gpu_bench import GPU_CONFIG, peak_flops, third_party_kernels  # noqa: E402
from harness import (  # noqa: E402
    PeakMemory,
    copy_bandwidth,
    interleaved,
    machine,
    matmul_ceiling,
    matmul_flops,
    wait_for_quiet,
)

import hf_moe  # noqa: E402
from hf_moe import MoEConfig, MoEForCausalLM  # noqa: E402
from hf_moe.conversion.families import config_from_moe, state_dict_from_moe  # noqa: E402
from hf_moe.kernels.cpu import gemm  # noqa: E402
from hf_moe.kernels.experts.fused import padded_count  # noqa: E402
from hf_moe.modeling.cache import MoECache  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("moe", "train", "prefill", "decode", "generate")
DECODE_BURST = 8  # consecutive decode steps timed together
LEAD_IN = 1  # untimed calls of the same contender before each timed MoE-layer / training-step call


def bench_config(**overrides: object) -> MoEConfig:
    """The speed issue's config: vocab 4096, hidden 512, 4 layers (1 dense), 8 heads, MLA q_lora 192 / kv_lora
    128 / rope 32 / nope 64 / v 64, 32 routed experts top-4 of width 128, 1 shared, groups 4/2."""
    fields: dict = dict(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        q_lora_rank=192, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
        n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=128, n_shared_experts=1,
        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=16384,
    )  # attention: hf_moe's default for ours ("hf_moe_sdpa"), transformers' sdpa for theirs
    fields.update(overrides)
    return MoEConfig(**fields)


def build_models(config: MoEConfig, device: torch.device, dtype: torch.dtype) -> tuple[MoEForCausalLM, DeepseekV3ForCausalLM]:
    """Ours with random weights, and transformers' DeepseekV3 loaded with exactly those weights. On a GPU both are
    built there (initialising billions of parameters on the host would take minutes)."""
    torch.manual_seed(0)
    with torch.device(device if device.type == "cuda" else "cpu"):
        return _build_models(config, device, dtype)


def _build_models(config: MoEConfig, device: torch.device, dtype: torch.dtype) -> tuple[MoEForCausalLM, DeepseekV3ForCausalLM]:
    ours = MoEForCausalLM(config)
    with torch.no_grad():  # a non-zero balancing bias, so routing differences would show
        for layer in ours.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.01)
    their_config = config_from_moe(config, "deepseek_v3")
    their_config._attn_implementation = "sdpa"
    theirs = DeepseekV3ForCausalLM(their_config)
    theirs.load_state_dict(state_dict_from_moe("deepseek_v3", ours.state_dict(), config), strict=True)
    return ours.to(device=device, dtype=dtype), theirs.to(device=device, dtype=dtype)


def config_summary(config: MoEConfig, model: torch.nn.Module) -> str:
    """One line: the widths that set the cost, total and active parameters."""
    active, _ = active_matmul_params(config)
    total = sum(p.numel() for p in model.parameters())
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return (f"vocab {config.vocab_size}, hidden {config.hidden_size}, {config.num_hidden_layers} layers "
            f"({config.num_hidden_layers - moe_layers} dense), {config.num_attention_heads} heads, "
            f"{config.n_routed_experts} routed experts top-{config.num_experts_per_tok} of width "
            f"{config.moe_intermediate_size}, {config.n_shared_experts} shared; {total / 1e9:.2f}B parameters, "
            f"{active / 1e9:.3f}B active per token (embeddings aside)")


def set_experts(model: torch.nn.Module, implementation: str) -> None:
    model.config._experts_implementation = implementation


def moe_flops(config: MoEConfig, tokens: int) -> float:
    """Forward+backward FLOPs of one MoE layer (router, routed and shared experts): 3x the forward's."""
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    forward = 2 * tokens * hidden * config.n_routed_experts  # router
    forward += 2 * tokens * config.num_experts_per_tok * 3 * hidden * inter  # routed SwiGLU experts
    forward += 2 * tokens * 3 * hidden * config.shared_intermediate_size  # shared experts
    return 3.0 * forward


def active_matmul_params(config: MoEConfig) -> tuple[int, int]:
    """(parameters every token multiplies in a forward, of which routed-expert ones), embeddings excluded."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    attn = hidden * config.q_lora_rank + config.q_lora_rank * heads * config.qk_head_dim
    attn += hidden * (config.kv_lora_rank + config.qk_rope_head_dim)
    attn += config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
    attn += heads * config.v_head_dim * hidden
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    dense_layers = config.num_hidden_layers - moe_layers
    routed = moe_layers * config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size
    ffn = dense_layers * 3 * hidden * config.intermediate_size + routed
    ffn += moe_layers * (3 * hidden * config.shared_intermediate_size + hidden * config.n_routed_experts)
    head = hidden * config.vocab_size
    return config.num_hidden_layers * attn + ffn + head, routed


def train_flops(config: MoEConfig, batch: int, length: int) -> float:
    """Forward+backward FLOPs of a training step: 6 x active params x tokens + causal attention scores."""
    params, _ = active_matmul_params(config)
    tokens = batch * length
    per_layer_attn = 2 * batch * length * length * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    return 6.0 * params * tokens + 3.0 * config.num_hidden_layers * per_layer_attn / 2


class MoEMatmulsOnly:
    """The matmuls of one MoE layer's forward+backward and nothing else (no routing, gathers, activations or
    autograd), with the current batch's per-expert token counts (`refresh` after new inputs), each multiplied as
    our layer multiplies it: on torch.mm into preallocated outputs, or on oneDNN where `hf_moe.kernels.cpu.gemm`
    chose it (expert segments at the padded sizes our layer uses there; the router on torch.mm, as ours). The
    floor any implementation of the layer runs into on this machine, at these shapes."""

    def __init__(self, block: torch.nn.Module, x: torch.Tensor) -> None:
        self.block, self.x = block, x
        self.tokens = x.reshape(-1, x.shape[-1])
        self.onednn = gemm.onednn_active(self.tokens)
        self.gate_up, self.down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
        self.grad_gate_up, self.grad_down = torch.zeros_like(self.gate_up), torch.zeros_like(self.down)
        self.shared = [w.detach() for w in (block.shared_experts.gate_proj.weight, block.shared_experts.up_proj.weight,
                                            block.shared_experts.down_proj.weight)] if block.shared_experts is not None else []
        self.router = block.gate.weight.detach()
        self.shared_act = (self.tokens.detach().new_empty(self.tokens.shape[0], self.shared[2].shape[1]).normal_()
                           if self.shared else None)
        self.refresh()

    def refresh(self) -> None:
        """Token counts of the current inputs (padded as our layer pads them), and slot buffers to match."""
        with torch.no_grad():
            routing = self.block.gate(self.tokens.detach())
        counts = torch.bincount(routing.topk_ids.reshape(-1), minlength=self.block.experts.num_experts).tolist()
        self.counts = [padded_count(c) for c in counts] if self.onednn else counts
        slots, inter = sum(self.counts), self.down.shape[-1]
        hidden = self.tokens.shape[1]  # random contents: uninitialised memory may hold slow denormals
        self.x_slots = self.tokens.detach().new_empty(slots, hidden).normal_()
        self.y_slots = self.tokens.detach().new_empty(slots, hidden).normal_()
        self.gu = self.tokens.detach().new_empty(slots, 2 * inter).normal_()
        self.act = self.tokens.detach().new_empty(slots, inter).normal_()

    def product(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.onednn:  # no out= there; products too small for oneDNN run torch.mm, as in the layer
            return gemm.mm(a, b, bucketed=True)
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)

    def linear_forward_backward(self, inputs: torch.Tensor, weight: torch.Tensor, on_torch_mm: bool = False) -> None:
        product = (lambda a, b: torch.mm(a, b)) if on_torch_mm else self.product
        out = product(inputs, weight.t())  # forward, then d_input = d_out W and d_W = d_out^T input
        product(out, weight)
        product(out.t(), inputs)

    def __call__(self) -> None:
        tokens = self.tokens.detach()
        self.linear_forward_backward(tokens, self.router, on_torch_mm=True)
        for weight in self.shared:
            self.linear_forward_backward(tokens if weight is not self.shared[2] else self.shared_act, weight)
        start, product = 0, self.product
        gate_up, down, x_slots, y_slots, gu, act = self.gate_up, self.down, self.x_slots, self.y_slots, self.gu, self.act
        for expert, count in enumerate(self.counts):
            rows = slice(start, start + count)
            start += count
            if count == 0:
                continue
            product(x_slots[rows], gate_up[expert].t(), gu[rows])  # forward
            product(act[rows], down[expert].t(), y_slots[rows])
            product(y_slots[rows], down[expert], act[rows])  # backward
            product(y_slots[rows].t(), act[rows], self.grad_down[expert])
            product(gu[rows], gate_up[expert], x_slots[rows])
            product(gu[rows].t(), x_slots[rows], self.grad_gate_up[expert])


def gemm_in_use(like: torch.Tensor) -> str:
    """The fp32 GEMM our fast paths run for tensors like this one: "onednn" or "torch.mm"."""
    return "onednn" if gemm.onednn_active(like) else "torch.mm"


def with_torch_gemm(fn: Callable[[], None], like: torch.Tensor) -> dict[str, Callable[[], None]]:
    """{"ours_torch_gemm": fn} where our fast paths run oneDNN (that contender runs them on torch.mm instead, to
    show what the GEMM choice alone is worth), else nothing."""
    return {"ours_torch_gemm": fn} if gemm.onednn_active(like) else {}


def select_gemm(contender: str) -> None:
    """torch.mm for the "ours_torch_gemm" contender, this process's choice (made once, in `main`) for every other."""
    gemm.set_cpu_gemm("aten" if contender == "ours_torch_gemm" else PROCESS_GEMM[0])


PROCESS_GEMM: list[str] = []


def with_triton(fn: Callable[[], None], like: torch.Tensor, ours: MoEForCausalLM, errors: dict) -> dict[str, Callable[[], None]]:
    """{"ours_triton": fn} on a GPU with Triton (that contender runs our layer with `hf_moe_triton` experts) if
    one call of it runs (its error goes to `errors` otherwise), else nothing."""
    import importlib.util

    if like.device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return {}
    try:
        select_experts(ours, "ours_triton")
        fn()
    except Exception as error:  # noqa: BLE001 - a finding to report, not a reason to lose the other contenders
        errors["ours_triton"] = f"{type(error).__name__}: {error}"
        print(f"ours_triton left out: {errors['ours_triton']}", flush=True)
        return {}
    finally:
        select_experts(ours, "ours")
    return {"ours_triton": fn}


def select_experts(ours: MoEForCausalLM, contender: str) -> None:
    """Our experts backend for a contender: `hf_moe_triton` for "ours_triton", the default `hf_moe_auto` else."""
    set_experts(ours, "hf_moe_triton" if contender == "ours_triton" else "hf_moe_auto")


# ---------------------------------------------------------------------------------------------- parts
def bench_moe_layer(ours: MoEForCausalLM, theirs: DeepseekV3ForCausalLM, config: MoEConfig, batch: int,
                    length: int, rounds: int, device: torch.device, dtype: torch.dtype,
                    flops_peak: float | None = None) -> dict:
    layer = config.first_k_dense_replace  # the first MoE layer
    our_block, their_block = ours.model.layers[layer].mlp, theirs.model.layers[layer].mlp
    our_block.train()
    their_block.train()
    x = torch.randn(batch, length, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def new_inputs() -> None:  # new hidden states each round: each expert's token count changes, as in training
        with torch.no_grad():
            x.normal_()
            grad.normal_()
        matmuls_only.refresh()
    matmuls, mm_flops = matmul_flops(device, dtype)

    def ours_step() -> None:
        our_block(x)[0].backward(grad)

    def theirs_step() -> None:
        their_block(x).backward(grad)

    implementation = {"transformers_grouped_mm": "grouped_mm", "transformers_eager": "eager"}
    errors: dict[str, str] = {}
    contenders = {"ours": ours_step, **with_torch_gemm(ours_step, x), **with_triton(ours_step, x, ours, errors),
                  "transformers_grouped_mm": theirs_step, "transformers_eager": theirs_step}

    def setup(name: str) -> None:
        x.grad = None
        our_block.zero_grad(set_to_none=True)
        their_block.zero_grad(set_to_none=True)
        select_gemm(name)
        select_experts(ours, name)
        if name in implementation:
            set_experts(theirs, implementation[name])

    set_experts(ours, "hf_moe_auto")
    matmuls_only = MoEMatmulsOnly(our_block, x)
    timings = interleaved({**contenders, "matmuls_only": matmuls_only, **matmuls}, rounds, device,
                          setup=setup, lead_in=LEAD_IN, new_round=new_inputs)
    select_gemm("ours")
    select_experts(ours, "ours")
    flops = moe_flops(config, batch * length)
    mm_rate, ceiling = matmul_ceiling(timings, mm_flops)
    result = {
        "tokens": batch * length, "flops_per_call": flops, "timings": timings.summary(),
        "speedup_vs_transformers_grouped_mm": timings.speedup("ours", "transformers_grouped_mm"),
        "speedup_vs_transformers_eager": timings.speedup("ours", "transformers_eager"),
        "matmul_flops_per_s": mm_rate, "matmul_ceiling": ceiling,
        "torch_mm_flops_per_s": mm_flops / timings.median(next(iter(matmuls))), "cpu_gemm": gemm_in_use(x),
        "matmul_size": round((mm_flops / 2) ** (1 / 3)), "peak_flops_per_s": flops_peak,
    }
    for name in (*contenders, "matmuls_only"):
        result[f"flops_per_s_{name}"] = flops / timings.median(name)
        if flops_peak:
            result[f"fraction_of_peak_{name}"] = flops / timings.median(name) / flops_peak
        result[f"fraction_of_matmul_{name}"] = flops / timings.median(name) / mm_rate
        result[f"fraction_of_torch_mm_{name}"] = flops / timings.median(name) / result["torch_mm_flops_per_s"]
    result["ours_over_matmuls_only"] = timings.speedup("matmuls_only", "ours")
    if "ours_torch_gemm" in contenders:
        result["speedup_vs_transformers_grouped_mm_with_torch_gemm"] = timings.speedup("ours_torch_gemm",
                                                                                      "transformers_grouped_mm")
    if "ours_triton" in contenders:
        result["speedup_triton_vs_transformers_grouped_mm"] = timings.speedup("ours_triton", "transformers_grouped_mm")
    if errors:
        result["errors"] = errors
    return result


def bench_train(ours: MoEForCausalLM, theirs: DeepseekV3ForCausalLM, config: MoEConfig, batch: int, length: int,
                rounds: int, device: torch.device, flops_peak: float | None = None) -> dict:
    """Forward+backward of the whole model on a new batch each round; `flops_peak` (dense FLOP/s) adds MFU."""
    ours.train()
    theirs.train()
    batches = [torch.randint(0, config.vocab_size, (batch, length), device=device)]
    implementation = {"transformers_grouped_mm": "grouped_mm", "transformers_eager": "eager"}
    like = torch.empty(0, device=device, dtype=next(ours.parameters()).dtype)

    def new_batch() -> None:  # a new batch each round: routing, and so each expert's token count, changes
        batches[0] = torch.randint(0, config.vocab_size, (batch, length), device=device)

    def step(model: torch.nn.Module) -> None:
        model(input_ids=batches[0], labels=batches[0]).loss.backward()

    def setup(name: str) -> None:
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        select_gemm(name)
        if name in implementation:
            set_experts(theirs, implementation[name])

    set_experts(ours, "hf_moe_auto")
    contenders = {"ours": lambda: step(ours), **with_torch_gemm(lambda: step(ours), like),
                  "transformers_grouped_mm": lambda: step(theirs), "transformers_eager": lambda: step(theirs)}
    matmuls, mm_flops = matmul_flops(device, next(ours.parameters()).dtype)
    timings = interleaved({**contenders, **matmuls}, rounds, device, setup=setup, lead_in=LEAD_IN,
                          new_round=new_batch)
    select_gemm("ours")
    mm_rate, ceiling = matmul_ceiling(timings, mm_flops)
    fastest = min(implementation, key=timings.median)
    tokens = batch * length
    flops = train_flops(config, batch, length)
    peaks = {}
    for name, fn in contenders.items():  # peak memory: one more untimed step each
        setup(name)
        with PeakMemory(device) as peak:
            fn()
        peaks[name] = peak.peak_bytes
    select_gemm("ours")
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    extra = {}
    if "ours_torch_gemm" in contenders:
        extra["speedup_vs_fastest_transformers_with_torch_gemm"] = timings.speedup("ours_torch_gemm", fastest)
    if flops_peak:
        extra["peak_flops_per_s"] = flops_peak
        extra["mfu"] = {name: flops / timings.median(name) / flops_peak for name in contenders}
    return {
        "batch": batch, "length": length, "timings": timings.summary(), "cpu_gemm": gemm_in_use(like),
        "matmul_ceiling": ceiling, **extra,
        "tokens_per_s": {name: tokens / timings.median(name) for name in contenders},
        "model_flops_per_step": flops,
        "model_flops_per_s": {name: flops / timings.median(name) for name in contenders},
        "matmul_flops_per_s": mm_rate,
        "fraction_of_matmul": {name: flops / timings.median(name) / mm_rate for name in contenders},
        "fastest_transformers": fastest,
        "speedup_vs_fastest_transformers": timings.speedup("ours", fastest),
        "speedup_vs_transformers_grouped_mm": timings.speedup("ours", "transformers_grouped_mm"),
        "speedup_vs_transformers_eager": timings.speedup("ours", "transformers_eager"),
        "peak_memory_bytes": peaks,
    }


def bench_prefill(ours: MoEForCausalLM, theirs: DeepseekV3ForCausalLM, config: MoEConfig, length: int, rounds: int,
                  device: torch.device) -> dict:
    ours.eval()
    theirs.eval()
    ids = torch.randint(0, config.vocab_size, (1, length), device=device)
    implementation = {"transformers_grouped_mm": "grouped_mm", "transformers_eager": "eager"}

    def setup(name: str) -> None:
        select_gemm(name)
        if name in implementation:
            set_experts(theirs, implementation[name])

    def ours_prefill() -> object:
        return ours(input_ids=ids, use_cache=True, logits_to_keep=1)

    like = torch.empty(0, device=device, dtype=next(ours.parameters()).dtype)
    with torch.inference_mode():
        contenders = {"ours": ours_prefill, **with_torch_gemm(ours_prefill, like),
                      "transformers_grouped_mm": lambda: theirs(input_ids=ids, use_cache=True, logits_to_keep=1),
                      "transformers_eager": lambda: theirs(input_ids=ids, use_cache=True, logits_to_keep=1)}
        timings = interleaved(contenders, rounds, device, setup=setup)
    select_gemm("ours")
    fastest = min(implementation, key=timings.median)
    extra = {}
    if "ours_torch_gemm" in contenders:
        extra["speedup_vs_fastest_transformers_with_torch_gemm"] = timings.speedup("ours_torch_gemm", fastest)
    return {
        "length": length, "timings": timings.summary(),
        "tokens_per_s": {name: length / timings.median(name) for name in contenders},
        "fastest_transformers": fastest, "speedup_vs_fastest_transformers": timings.speedup("ours", fastest), **extra,
    }


def filled_cache(cache_class: type[DynamicCache], config: object, latents: list[torch.Tensor],
                 rope_keys: list[torch.Tensor]) -> DynamicCache:
    """A cache holding the given per-layer (latent, rotated k_pe): both models cache exactly these. Each model
    gets the cache class its generate() creates by default: transformers' DynamicCache, hf_moe's MoECache."""
    cache = cache_class(config=config)
    for layer, (latent, k_pe) in enumerate(zip(latents, rope_keys)):
        cache.update(latent.clone(), k_pe.clone(), layer)
    return cache


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of the cached tokens."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def cache_allocated_bytes(cache: DynamicCache) -> int:
    """Bytes the cache holds, spare capacity of MoECache's growable buffers included."""
    total = 0
    for layer in cache.layers:
        buffers = (getattr(layer, "key_buffer", None), getattr(layer, "value_buffer", None))
        tensors = buffers if all(b is not None for b in buffers) else (layer.keys, layer.values)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def decode_bytes_per_step(config: MoEConfig, context: int, dtype: torch.dtype) -> float:
    """Bytes a batch-1 decode step must read at least: active weights (embedding row aside) plus the cache."""
    params, _ = active_matmul_params(config)
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    element = torch.finfo(dtype).bits // 8
    return float((params + context * per_token) * element)


def bench_decode(ours: MoEForCausalLM, theirs: DeepseekV3ForCausalLM, config: MoEConfig, context: int, rounds: int,
                 device: torch.device, dtype: torch.dtype, bandwidth: float) -> dict:
    """Seconds per decode step (batch 1) with `context` tokens already cached. As in generation, a contender runs
    `DECODE_BURST` consecutive steps per turn (interleaving single steps of two models would time each one with
    the other's working set in the caches); the cache is cropped back between turns."""
    ours.eval()
    theirs.eval()
    layers = config.num_hidden_layers
    latents = [torch.randn(1, 1, context, config.kv_lora_rank, device=device, dtype=dtype) for _ in range(layers)]
    rope_keys = [torch.randn(1, 1, context, config.qk_rope_head_dim, device=device, dtype=dtype) for _ in range(layers)]
    caches = {"ours": filled_cache(MoECache, ours.config, latents, rope_keys),
              "ours_dynamic_cache": filled_cache(DynamicCache, ours.config, latents, rope_keys),
              "ours_expanded": filled_cache(MoECache, ours.config, latents, rope_keys),
              "transformers_grouped_mm": filled_cache(DynamicCache, theirs.config, latents, rope_keys),
              "transformers_eager": filled_cache(DynamicCache, theirs.config, latents, rope_keys)}
    del latents, rope_keys
    token = torch.tensor([[7]], device=device)
    position = torch.tensor([[context]], device=device)
    implementation = {"transformers_grouped_mm": "grouped_mm", "transformers_eager": "eager"}

    def set_absorb(flag: bool) -> None:
        for layer in ours.model.layers:
            layer.self_attn.absorb = flag

    def step(name: str) -> torch.Tensor:
        model = theirs if name.startswith("transformers") else ours
        return model(input_ids=token, position_ids=position, cache=caches[name], use_cache=True).logits

    def burst(name: str) -> None:
        for _ in range(DECODE_BURST):
            step(name)

    def setup(name: str) -> None:
        extra = caches[name].get_seq_length() - context
        if extra > 0:
            caches[name].crop(-extra)
        set_absorb(name != "ours_expanded")
        if name in implementation:
            set_experts(theirs, implementation[name])

    with torch.inference_mode():
        logits = {}
        for name in caches:
            setup(name)
            logits[name] = step(name).float()
        timings = interleaved({name: (lambda n=name: burst(n)) for name in caches}, rounds, device, setup=setup)
        timings.seconds = {name: [t / DECODE_BURST for t in values] for name, values in timings.seconds.items()}
        peaks = {}
        for name in ("ours", "transformers_grouped_mm"):
            setup(name)
            with PeakMemory(device) as peak:
                step(name)
            peaks[name] = peak.peak_bytes
        setup("ours")
        bytes_ours = cache_bytes(caches["ours"]) / context
        allocated_ours = cache_allocated_bytes(caches["ours"]) / context
        setup("transformers_grouped_mm")
        bytes_theirs = cache_bytes(caches["transformers_grouped_mm"]) / context
    set_absorb(True)
    fastest = min(implementation, key=timings.median)
    bound = decode_bytes_per_step(config, context, dtype) / bandwidth
    return {
        "context": context, "timings": timings.summary(),
        "seconds_per_token": {name: timings.median(name) for name in caches},
        "fastest_transformers": fastest,
        "speedup_vs_fastest_transformers": timings.speedup("ours", fastest),
        "speedup_vs_transformers_grouped_mm": timings.speedup("ours", "transformers_grouped_mm"),
        "speedup_absorbed_vs_our_expanded": timings.speedup("ours", "ours_expanded"),
        "speedup_moe_cache_vs_dynamic_cache": timings.speedup("ours", "ours_dynamic_cache"),
        "max_abs_logit_diff_vs_transformers": (logits["ours"] - logits["transformers_grouped_mm"]).abs().max().item(),
        "max_abs_logit_diff_absorbed_vs_expanded": (logits["ours"] - logits["ours_expanded"]).abs().max().item(),
        "kv_cache_bytes_per_token": {"ours": bytes_ours, "transformers": bytes_theirs},
        "kv_cache_allocated_bytes_per_token": {"ours": allocated_ours, "transformers": bytes_theirs},
        "memory_bound_seconds": bound, "ours_over_memory_bound": timings.median("ours") / bound,
        "peak_memory_bytes": peaks,
    }


def parity(ours: MoEForCausalLM, theirs: DeepseekV3ForCausalLM, config: MoEConfig, device: torch.device) -> dict:
    """Same weights, same logits: the comparison is between two implementations of one model."""
    ours.eval()
    theirs.eval()
    set_experts(ours, "hf_moe_auto")
    set_experts(theirs, "grouped_mm")
    ids = torch.randint(0, config.vocab_size, (2, 64), device=device)
    with torch.inference_mode():
        diff = (ours(input_ids=ids).logits.float() - theirs(input_ids=ids).logits.float()).abs().max().item()
    return {"max_abs_logit_diff": diff}


# ---------------------------------------------------------------------------------------------- report
def goals(results: dict) -> list[dict]:
    rows = []

    def add(goal: str, measured: float | None, target: float, higher_is_better: bool = True) -> None:
        if measured is None:
            rows.append({"goal": goal, "target": target, "measured": None, "met": None})
            return
        met = measured >= target if higher_is_better else measured <= target
        rows.append({"goal": goal, "target": target, "measured": measured, "met": bool(met)})

    moe, train, decode = results.get("moe_layer"), results.get("train_step"), results.get("decode", {})
    add("MoE layer fwd+bwd speed-up vs transformers grouped_mm", moe and moe["speedup_vs_transformers_grouped_mm"], 1.25)
    add("MoE layer FLOP/s as a fraction of plain matmul FLOP/s", moe and moe["fraction_of_matmul_ours"], 0.65)
    add("training step speed-up vs transformers' fastest experts backend",
        train and train["speedup_vs_fastest_transformers"], 1.3)
    for context, target in ((2048, 3.0), (8192, 5.0)):
        entry = decode.get(str(context))
        add(f"decode speed-up at {context} context vs transformers' fastest", entry and
            entry["speedup_vs_fastest_transformers"], target)
    generated = results.get("generate", {})
    for context, target in ((512, 3.0), (2048, 4.0)):
        entry = generated.get(str(context))
        add(f"decode through generate() at {context} context vs transformers' fastest", entry and
            entry.get("speedup_ours_vs_fastest_transformers"), target)
        add(f"decode through generate(), static cache + compiled, at {context} context vs transformers' fastest",
            entry and entry.get("speedup_ours_static_compiled_vs_fastest_transformers"), target)
    entry = generated.get("2048")
    add("our generate() decode step at 2048 context / memory bound", entry and entry.get("ours_over_memory_bound"),
        2.0, higher_is_better=False)
    add("our static-cache compiled generate() decode step at 2048 context / memory bound",
        entry and entry.get("ours_static_compiled_over_memory_bound"), 2.0, higher_is_better=False)
    if decode:
        entry = decode[max(decode, key=int)]
        ratio = entry["kv_cache_bytes_per_token"]["ours"] / entry["kv_cache_bytes_per_token"]["transformers"]
        add("KV-cache bytes/token, ours / transformers", ratio, 1.0, higher_is_better=False)
    if results["settings"]["device"].startswith("cuda"):  # the GPU goals (issue 18)
        add("GPU training step MFU (ours, model FLOPs / dense peak)", train and train.get("mfu", {}).get("ours"), 0.30)
        for context, entry in sorted(decode.items(), key=lambda kv: int(kv[0])):
            add(f"GPU decode at {context} context (batch 1): ours / HBM bound", entry["ours_over_memory_bound"], 2.0,
                higher_is_better=False)
    return rows


def markdown(results: dict) -> str:
    lines = [f"# hf_moe vs transformers DeepseekV3 ({results['settings']['device']}, {results['settings']['dtype']})", ""]
    m = results["machine"]
    others = ", ".join(f"{part} {busy:.0%}" for part, busy in results.get("others_cpu_use_before_part", {}).items())
    if "gpu" in m:
        lines += [f"Machine: {m['gpu']} (compute capability {m.get('gpu_capability')}, {m.get('gpu_sms')} SMs, "
                  f"{m.get('gpu_memory_bytes', 0) / 2**30:.0f} GiB; nvidia-smi driver, max SM/memory clocks, power "
                  f"limit: {m.get('nvidia_smi')}), host {m.get('lscpu Model name', '?')} with {m.get('cpu_count')} "
                  f"CPUs; torch {m['torch']} (CUDA {m.get('torch_cuda')}), triton {m.get('triton', '-')}, "
                  f"transformers {m.get('transformers')}. Speed-ups are medians of per-round ratios of interleaved "
                  "runs.", ""]
    else:
        lines += [f"Machine: {m.get('lscpu Model name', '?')}, {m.get('cpu_count')} CPUs, "
                  f"{m['torch_threads']} torch threads, torch {m['torch']}, transformers {m.get('transformers')}. "
                  "Speed-ups are medians of per-round ratios of interleaved runs. Other jobs share these CPUs; their "
                  f"CPU use just before each part: {others or 'not measured'}.", ""]
    lines += [f"Config: {results.get('config_name', 'issue')} ({results.get('config_summary', '')}).", ""]
    lines += ["| goal | target | measured | met |", "|---|---|---|---|"]
    for row in results["goals"]:
        measured = "-" if row["measured"] is None else f"{row['measured']:.3g}"
        met = "-" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['goal']} | {row['target']} | {measured} | {met} |")
    lines.append("")
    moe, train = results.get("moe_layer", {}), results.get("train_step", {})
    prefill = results.get("prefill", {})
    with_torch = [f"{label} {value:.2f}x" for label, value in (
        ("MoE layer vs grouped_mm", moe.get("speedup_vs_transformers_grouped_mm_with_torch_gemm")),
        ("training step vs the fastest transformers backend", train.get("speedup_vs_fastest_transformers_with_torch_gemm")),
        ("prefill", prefill.get("speedup_vs_fastest_transformers_with_torch_gemm")),
    ) if value is not None]
    if with_torch:
        lines += [f"With our products on torch.mm instead of oneDNN (the GEMM transformers uses): {', '.join(with_torch)}.",
                  ""]
    if moe:
        lines += [f"The MoE layer's matmuls alone (matmuls_only) reach {moe['fraction_of_matmul_matmuls_only']:.2f} of "
                  "the plain matmul's FLOP/s at these shapes: no implementation of the layer gets above that here.", ""]
    if "moe_layer" in results:
        r = results["moe_layer"]
        lines += [f"## MoE layer forward+backward ({r['tokens']} tokens, {r['flops_per_call'] / 1e9:.2f} GFLOP)", "",
                  "| implementation | median ms | GFLOP/s | fraction of matmul | fraction of torch.mm |",
                  "|---|---|---|---|---|"]
        for name in ("ours", "ours_torch_gemm", "ours_triton", "transformers_grouped_mm", "transformers_eager",
                     "matmuls_only"):
            if name not in r["timings"]:
                continue
            lines.append(f"| {name} | {r['timings'][name]['median_s'] * 1e3:.2f} | "
                         f"{r[f'flops_per_s_{name}'] / 1e9:.1f} | {r[f'fraction_of_matmul_{name}']:.2f} | "
                         f"{r.get(f'fraction_of_torch_mm_{name}', float('nan')):.2f} |")
        size = r.get("matmul_size", 2048)
        for name, label in ((f"matmul_{size}", f"plain {size}^3 torch.mm"),
                            (f"matmul_{size}_onednn", f"plain {size}^3 oneDNN")):
            if name in r["timings"]:
                rate = 2.0 * size**3 / r["timings"][name]["median_s"]
                lines.append(f"| {label} | {r['timings'][name]['median_s'] * 1e3:.2f} | {rate / 1e9:.1f} | "
                             f"{rate / r['matmul_flops_per_s']:.2f} | {rate / r['torch_mm_flops_per_s']:.2f} |")
        lines += ["", f"Our fast paths ran their fp32 products on {r.get('cpu_gemm', 'torch.mm')}; \"fraction of "
                  "matmul\" is against the faster plain matmul (the machine's GEMM ceiling), \"ours_torch_gemm\" is our "
                  "layer with its products on torch.mm.", ""]
    for key, title in (("train_step", "Training step (forward+backward)"), ("prefill", "Prefill")):
        if key in results:
            r = results[key]
            mfu = r.get("mfu", {})
            lines += [f"## {title}", ""]
            if key == "train_step":
                lines += [f"Batch {r['batch']} x {r['length']} tokens, {r['model_flops_per_step'] / 1e12:.2f} TFLOP "
                          "per step (6 x active parameters x tokens + causal attention)."
                          + (f" MFU against {r['peak_flops_per_s'] / 1e12:.0f} TFLOP/s ({results.get('peak_source')})."
                             if mfu else ""), ""]
            lines += ["| implementation | median s | tokens/s | model FLOP/s as a fraction of matmul | "
                      + ("MFU | " if mfu else "") + "peak memory MB |", "|---|---|---|---|" + ("---|" if mfu else "") + "---|"]
            for name, rate in r["tokens_per_s"].items():
                peak = r.get("peak_memory_bytes", {}).get(name)
                fraction = r.get("fraction_of_matmul", {}).get(name)
                lines.append(f"| {name} | {r['timings'][name]['median_s']:.4f} | {rate:.0f} | "
                             f"{'-' if fraction is None else f'{fraction:.2f}'} | "
                             + (f"{mfu[name]:.3f} | " if mfu else "")
                             + f"{'-' if peak is None else f'{peak / 2**20:.0f}'} |")
            lines.append("")
    if results.get("decode"):
        lines += ["## Decode (batch 1, seconds per token)", "",
                  "\"ours\": absorbed MLA with MoECache (our default cache); \"with DynamicCache\": the same with "
                  "transformers' cache; \"expanded\": absorption off. KV bytes are per cached token; \"allocated\" "
                  "counts MoECache's spare capacity too. Memory bound: the bytes a step must read (active weights and "
                  f"the latent cache) over the measured copy bandwidth, "
                  f"{results.get('memory_copy_bytes_per_s', float('nan')) / 1e9:.0f} GB/s (read + write).", "",
                  "| context | ours | ours with DynamicCache | ours expanded | transformers grouped_mm | "
                  "transformers eager | speed-up | KV bytes/token ours / theirs (allocated) | ours / memory bound "
                  "(bound) |",
                  "|---|---|---|---|---|---|---|---|---|"]

        def ms(seconds: float) -> str:
            return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"

        for context, r in sorted(results["decode"].items(), key=lambda kv: int(kv[0])):
            s, kv = r["seconds_per_token"], r["kv_cache_bytes_per_token"]
            allocated = r["kv_cache_allocated_bytes_per_token"]["ours"]
            lines.append(f"| {context} | {ms(s['ours'])} | {ms(s['ours_dynamic_cache'])} | "
                         f"{ms(s['ours_expanded'])} | {ms(s['transformers_grouped_mm'])} | "
                         f"{ms(s['transformers_eager'])} | {r['speedup_vs_fastest_transformers']:.2f}x | "
                         f"{kv['ours']:.0f} / {kv['transformers']:.0f} ({allocated:.0f}) | "
                         f"{r['ours_over_memory_bound']:.1f}x ({ms(r['memory_bound_seconds'])}) |")
        lines.append("")
    if results.get("generate"):
        lines += generate_markdown(results["generate"])
    if "gpu" in results:
        lines += [f"GPU: {results['gpu']}", ""]
    for part, error in results.get("failed_parts", {}).items():
        lines += [f"FAILED {part}: {error}", ""]
    for name, error in results.get("moe_layer", {}).get("errors", {}).items():
        lines += [f"Left out of the MoE layer part, {name}: {error}", ""]
    if results.get("skipped_for_time"):
        lines += [f"Skipped, the time budget being spent: {', '.join(results['skipped_for_time'])}.", ""]
    return "\n".join(lines)


def generate_markdown(generated: dict) -> list[str]:
    """The table of decode through generate(): ms per new token of every contender, speed-ups, memory bound."""
    names = ("ours", "ours_static_compiled", "transformers_grouped_mm", "transformers_eager",
             "transformers_static_compiled")
    lines = ["## Decode through generate() (batch 1, ms per new token)", "",
             "Timed inside generate() by a logits processor stamping every step (prefill excluded, all of "
             "generate()'s per-step work included); *_static_compiled: `cache_implementation=\"static\"` with "
             "generate()'s compiled decode step (fullgraph). \"same\": greedy tokens equal ours.", "",
             "| context | " + " | ".join(names) + " | ours speed-up | compiled speed-up | ours / memory bound |",
             "|---|" + "---|" * (len(names) + 3)]
    for context, r in sorted(generated.items(), key=lambda kv: int(kv[0])):
        cells = []
        for name in names:
            if name in r["seconds_per_token"]:
                same = "" if name == "ours" or r["same_greedy_tokens_as_ours"].get(name) else " (tokens differ)"
                cells.append(f"{r['seconds_per_token'][name] * 1e3:.2f}{same}")
            else:
                cells.append("failed" if name in r["errors"] else "-")
        speedups = [r.get(f"speedup_{n}_vs_fastest_transformers") for n in ("ours", "ours_static_compiled")]
        bound = r.get("ours_over_memory_bound")
        lines.append(f"| {context} | " + " | ".join(cells) + " | "
                     + " | ".join("-" if v is None else f"{v:.2f}x" for v in speedups)
                     + f" | {'-' if bound is None else f'{bound:.1f}x'} |")
    lines.append("")
    for context, r in sorted(generated.items(), key=lambda kv: int(kv[0])):
        for name, error in r["errors"].items():
            lines.append(f"generate() at {context}, {name} failed: {error}")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256, help="training/MoE sequence length")
    parser.add_argument("--prefill-length", type=int, default=2048)
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds for the MoE layer and training")
    parser.add_argument("--decode-rounds", type=int, default=15)
    parser.add_argument("--generate-tokens", type=int, default=32, help="new tokens per generate() call")
    parser.add_argument("--generate-rounds", type=int, default=3, help="interleaved generate() rounds per context")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, contexts 128,512")
    parser.add_argument("--name", default=None, help="results file stem (default: the device type)")
    parser.add_argument("--max-busy", type=float, default=0.25,
                        help="before each part, wait until other jobs use at most this fraction of the CPUs")
    parser.add_argument("--quiet-timeout", type=float, default=60.0, help="longest wait for a quiet machine (s)")
    parser.add_argument("--config", default="issue", choices=("issue", "gpu"),
                        help="issue: the speed issue's small config; gpu: the larger one of gpu_bench.GPU_CONFIG")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="dense peak FLOP/s for MFU (default: the datasheet peak of an H100/H200 SXM)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where <name>.json and <name>.md go")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which the remaining parts and decode contexts are skipped")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.decode_rounds, args.contexts, args.prefill_length = 2, 2, "128,512", 256
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")

    PROCESS_GEMM.append(gemm.cpu_gemm())  # decided after the thread count is set: the probe times both GEMMs
    config = bench_config(**(GPU_CONFIG if args.config == "gpu" else {}))
    ours, theirs = build_models(config, device, dtype)
    started = time.time()
    peak, peak_source = peak_flops(device, dtype, args.peak_flops)
    results: dict = {
        "config_name": args.config, "config_summary": config_summary(config, ours),
        "peak_flops_per_s": peak, "peak_source": peak_source,
        "machine": machine(device),
        "load_average_at_start": os.getloadavg(),
        "settings": {"device": str(device), "dtype": args.dtype, "threads": args.threads, "rounds": args.rounds,
                     "decode_rounds": args.decode_rounds, "hf_moe": hf_moe.__version__,
                     "cpu_gemm_choice": PROCESS_GEMM[0]},
        "config": {k: v for k, v in config.to_diff_dict().items() if not k.startswith("_")},
        "parity": parity(ours, theirs, config, device),
    }
    print(f"parity: {results['parity']}", flush=True)
    others = results["others_cpu_use_before_part"] = {}
    skipped = results["skipped_for_time"] = []
    if device.type == "cuda":
        results["third_party_kernels"] = third_party_kernels(device)
        results["gpu"] = (f"measured on {results['machine']['gpu']}; MFU against {peak_source}; "
                          + "; ".join(f"{k}: {v}" for k, v in results["third_party_kernels"].items()))
    else:
        results["gpu"] = "not measured: no GPU was available for this run (bf16 MFU and HBM-bound decode need one)"
    stem = args.name or device.type

    def save() -> None:  # after every part, so that a run cut short keeps what it measured
        results["goals"] = goals(results)
        results["seconds"] = time.time() - started
        results["load_average_at_end"] = os.getloadavg()
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(results) + "\n")

    def quiet(part: str) -> bool:
        """Wait for a quiet CPU; False (and the part noted as skipped) once the time budget is spent."""
        if args.time_budget is not None and time.time() - started > args.time_budget:
            skipped.append(part)
            print(f"{part}: skipped, the time budget of {args.time_budget:.0f} s is spent", flush=True)
            return False
        if device.type == "cpu":
            others[part] = wait_for_quiet(args.max_busy, args.quiet_timeout)
        return True

    failed = results["failed_parts"] = {}

    def guarded(part: str, fn: Callable[[], object]) -> object | None:
        """fn(), or None with the error kept in results["failed_parts"] (one part failing, on a GPU lent for a few
        minutes, must not lose the others); the process then exits with status 1."""
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - reported, then the next part runs
            import traceback

            failed[part] = f"{type(error).__name__}: {error}"
            print(f"{part} FAILED: {failed[part]}\n{traceback.format_exc()}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    if "moe" in parts and quiet("moe"):
        moe = guarded("moe", lambda: bench_moe_layer(ours, theirs, config, args.batch, args.length, args.rounds * 2,
                                                     device, dtype, peak))
        if moe is not None:
            results["moe_layer"] = moe
            print(f"moe: {moe['speedup_vs_transformers_grouped_mm']:.2f}x vs grouped_mm, "
                  f"{moe['fraction_of_matmul_ours']:.2f} of matmul", flush=True)
        save()
    if "train" in parts and quiet("train"):
        train = guarded("train", lambda: bench_train(ours, theirs, config, args.batch, args.length, args.rounds,
                                                     device, peak))
        if train is not None:
            results["train_step"] = train
            mfu = train.get("mfu", {}).get("ours")
            print(f"train: {train['speedup_vs_fastest_transformers']:.2f}x"
                  + (f", MFU {mfu:.3f}" if mfu is not None else ""), flush=True)
        save()
    if "prefill" in parts and quiet("prefill"):
        prefill = guarded("prefill", lambda: bench_prefill(ours, theirs, config, args.prefill_length,
                                                           max(args.rounds // 2, 2), device))
        if prefill is not None:
            results["prefill"] = prefill
            print(f"prefill: {prefill['speedup_vs_fastest_transformers']:.2f}x", flush=True)
        save()
    if "decode" in parts:
        bandwidth = copy_bandwidth(device)
        results["memory_copy_bytes_per_s"] = bandwidth
        results["decode"] = {}
        for context in (int(c) for c in args.contexts.split(",")):
            if not quiet(f"decode {context}"):
                continue
            rounds = args.decode_rounds if context <= 2048 else max(args.decode_rounds // 2, 2)
            entry = guarded(f"decode {context}", lambda c=context, r=rounds: bench_decode(
                ours, theirs, config, c, r, device, dtype, bandwidth))
            if entry is not None:
                results["decode"][str(context)] = entry
                print(f"decode {context}: {entry['speedup_vs_fastest_transformers']:.2f}x, "
                      f"{entry['ours_over_memory_bound']:.1f}x the memory bound", flush=True)
            save()
    if "generate" in parts:
        bandwidth = results.get("memory_copy_bytes_per_s") or copy_bandwidth(device)
        results["memory_copy_bytes_per_s"] = bandwidth
        results["generate"] = {}
        for context in (int(c) for c in args.contexts.split(",")):
            if not quiet(f"generate {context}"):
                continue
            entry = guarded(f"generate {context}", lambda c=context: bench_generate(
                ours, theirs, config.vocab_size, c, args.generate_tokens, args.generate_rounds, device, set_experts))
            if entry is not None:
                if "ours" in entry["seconds_per_token"]:
                    bound = decode_bytes_per_step(config, context, dtype) / bandwidth
                    entry["memory_bound_seconds"] = bound
                    entry["ours_over_memory_bound"] = entry["seconds_per_token"]["ours"] / bound
                    if "ours_static_compiled" in entry["seconds_per_token"]:
                        entry["ours_static_compiled_over_memory_bound"] = (
                            entry["seconds_per_token"]["ours_static_compiled"] / bound)
                results["generate"][str(context)] = entry
                print(f"generate {context}: {entry.get('speedup_ours_vs_fastest_transformers', float('nan')):.2f}x; "
                      f"errors: {entry['errors'] or 'none'}", flush=True)
            save()
    save()
    print(markdown(results))
    if failed:
        sys.exit(f"failed parts: {', '.join(failed)}")


if __name__ == "__main__":
    main()
