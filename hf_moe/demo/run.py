"""`hf-moe demo`: the README's main job, offline on a laptop CPU.

1. pretrain a small DeepSeek-V3-style MoE (MLA, sigmoid group-limited routing, bias balancing, MTP) from
   scratch on Python's standard-library sources with transformers' Trainer (`hf_moe.demo.recipe`);
2. save it, reload it through `AutoModelForCausalLM` / `AutoTokenizer` and check the logits are identical;
3. generate with the KV cache and with MTP self-speculation, and check both give the same greedy text;
4. print the parameter report and where everything was written;
5. with `analyze=True` (`hf-moe demo --analyze`): save checkpoints while training, then `hf-moe analyze` the
   model on code vs prose of held-out standard-library files (`hf_moe.analysis.stdlib_domains`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..inspection import count_parameters, format_parameter_report
from .recipe import run_pretraining

PROMPT = "def fibonacci(n):\n    "


def run_demo(
    output_dir: str | Path = "outputs/demo", max_steps: int | None = None, quick: bool = False, analyze: bool = False
) -> dict:
    """Run the demo; returns the metrics (losses, MaxVio, MTP acceptance, reload and generation checks)."""
    output_dir = Path(output_dir)
    steps = max_steps if max_steps is not None else (20 if quick else 300)
    print(f"== 1. pretraining a DeepSeek-V3-style MoE for {steps} steps (output: {output_dir})")
    result = run_pretraining(output_dir, max_steps=steps, quick=quick, plots=_has_matplotlib(),
                             save_steps=-(-steps // 12) if analyze else None)
    final = output_dir / "final"

    print(f"== 2. reloading {final} with AutoModelForCausalLM")
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        reload_diff = (model(**prompt).logits - result.model.eval()(**prompt).logits).abs().max().item()
    print(f"   {type(model).__name__}: max |logit difference| vs the trained model = {reload_diff:.1e}")
    if reload_diff > 1e-5:
        raise RuntimeError(f"the reloaded model differs from the trained one (max |dlogit| = {reload_diff})")

    print("== 3. greedy generation: KV cache vs MTP self-speculation")
    cached = model.generate(**prompt, max_new_tokens=40, do_sample=False, eos_token_id=None)
    speculative = model.generate_with_mtp(prompt.input_ids, max_new_tokens=40, eos_token_id=[])
    same = torch.equal(cached, speculative.sequences)
    print(tokenizer.decode(cached[0]))
    print(f"   MTP: {speculative.accepted}/{speculative.drafted} drafts accepted, {speculative.main_forwards} main "
          f"forwards for {speculative.new_tokens} tokens; identical to plain greedy: {same}")
    if not same:
        raise RuntimeError("MTP speculative decoding changed the greedy output")

    print("== 4. the model")
    print(format_parameter_report(count_parameters(model), model.config))
    print(f"\nmodel + tokenizer: {final}\nmetrics: {output_dir / 'metrics.json'}")
    if (output_dir / "expert_load.png").exists():
        print(f"plots: {output_dir / 'expert_load.png'}, {output_dir / 'max_vio.png'}")
    if analyze:
        from ..analysis.stdlib_domains import analyze_demo_run

        print("== 5. routing analysis: code vs prose, early routing learning over the checkpoints")
        analyze_demo_run(output_dir, max_tokens=2_000 if quick else 20_000)
    return {**result.metrics, "reload_max_abs_diff": reload_diff, "mtp_greedy_identical": same}


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
