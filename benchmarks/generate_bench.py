"""Decode speed through `generate()`, the entry point users call (issue 18): seconds per new token at a given
context, for every contender, in one process on the same weights.

A logits processor stamps the clock at every generation step (it runs once per step, inside generate's loop,
after that step's forward): seconds per token = (last stamp - first stamp) / (new tokens - 1). The prefill
(the first stamp) is left out, every per-step cost generate() adds (input preparation, cache bookkeeping,
logits processing, stopping criteria) is in. Contenders:

- `ours`: MoEForCausalLM with its defaults (hf_moe_sdpa attention, hf_moe_auto experts, MoECache).
- `ours_static_compiled`: `cache_implementation="static"` with generate()'s own compile of the decode step
  (`CompileConfig(fullgraph=True)`; on CPU transformers compiles only when asked, `_compile_all_devices`).
- `transformers_grouped_mm`, `transformers_eager`: DeepseekV3ForCausalLM (sdpa attention), default cache.
- `transformers_static_compiled`: the same with the static cache and the compiled decode step.
A contender that fails (e.g. a compile error) is reported with its error instead of a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.configuration_utils import CompileConfig

COMPILED = ("ours_static_compiled", "transformers_static_compiled")


class StepClock(LogitsProcessor):
    """Records time.perf_counter() each time generate() processes a step's logits; scores pass unchanged."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.device.type == "cuda":
            torch.cuda.synchronize(scores.device)
        self.stamps.append(time.perf_counter())
        return scores

    def seconds_per_token(self) -> float:
        if len(self.stamps) < 2:
            raise RuntimeError("generate() ran fewer than 2 steps: no decode step was timed")
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


def generate_kwargs(name: str, new_tokens: int) -> dict:
    """generate()'s arguments for a contender: greedy, exactly `new_tokens` new tokens."""
    kwargs: dict = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if name in COMPILED:
        compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        compile_config._compile_all_devices = True  # transformers compiles on CPU only when this flag is set
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    return kwargs


def bench_generate(ours: torch.nn.Module, theirs: torch.nn.Module, vocab_size: int, context: int, new_tokens: int,
                   rounds: int, device: torch.device, set_experts: Callable[[torch.nn.Module, str], None],
                   contenders: tuple[str, ...] | None = None) -> dict:
    """Median seconds per new token through generate() with a `context`-token prompt (batch 1), interleaved
    over `rounds` rounds after one untimed warm-up call each (which also compiles the compiled contenders).
    Also checks that every contender generated the same greedy tokens as `ours` (same weights)."""
    ours.eval()
    theirs.eval()
    names = contenders or ("ours", "ours_static_compiled", "transformers_grouped_mm", "transformers_eager",
                           "transformers_static_compiled")
    experts = {"transformers_grouped_mm": "grouped_mm", "transformers_eager": "eager",
               "transformers_static_compiled": "grouped_mm"}
    generator = torch.Generator().manual_seed(context)
    prompt = torch.randint(1, vocab_size, (1, context), generator=generator).to(device)
    errors: dict[str, str] = {}
    tokens: dict[str, torch.Tensor] = {}
    seconds: dict[str, list[float]] = {name: [] for name in names}

    def run(name: str) -> float:
        model = theirs if name.startswith("transformers") else ours
        if name in experts:
            set_experts(theirs, experts[name])
        clock = StepClock()
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 logits_processor=LogitsProcessorList([clock]), **generate_kwargs(name, new_tokens))
        tokens[name] = out[0, context:].cpu()
        return clock.seconds_per_token()

    for name in names:  # warm-up (and compile); a contender that cannot run is reported, not timed
        try:
            run(name)
        except Exception as error:  # noqa: BLE001 - recorded in the results
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    timed = [name for name in names if name not in errors]
    for _ in range(rounds):
        for name in timed:
            seconds[name].append(run(name))
    per_token = {name: statistics.median(seconds[name]) for name in timed}
    same = {name: bool(torch.equal(tokens[name], tokens["ours"])) for name in timed if "ours" in tokens}
    fastest = min((n for n in timed if n.startswith("transformers")), key=per_token.get, default=None)
    result = {"context": context, "new_tokens": new_tokens, "rounds": rounds,
              "seconds_per_token": per_token, "rounds_seconds": {n: seconds[n] for n in timed},
              "same_greedy_tokens_as_ours": same, "errors": errors, "fastest_transformers": fastest}
    for name in ("ours", "ours_static_compiled"):
        if name in per_token and fastest is not None:
            result[f"speedup_{name}_vs_fastest_transformers"] = statistics.median(
                t / o for o, t in zip(seconds[name], seconds[fastest]))
    return result
