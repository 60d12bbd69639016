"""The `hf-moe` command. Each subcommand parses its arguments and makes one library call."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .conversion.upcycle_recipe import ROUTER_INITS, SCALE_TARGETS, SCORING_FUNCS, SHARED_SELECTIONS, STRATEGIES


def _inspect(args: argparse.Namespace) -> None:
    from .inspection import count_parameters, format_parameter_report
    from .modeling.configuration import MoEConfig

    if (args.preset is None) == (args.path is None):
        raise SystemExit("hf-moe inspect: give exactly one of DIR or --preset NAME")
    config = MoEConfig.from_preset(args.preset) if args.preset else MoEConfig.from_pretrained(args.path)
    print(format_parameter_report(count_parameters(config), config))


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.output_dir, max_steps=args.max_steps, quick=args.quick, analyze=args.analyze)


def _upcycle(args: argparse.Namespace) -> None:
    from .conversion.upcycle import upcycle

    report = upcycle(
        args.src, args.out, num_experts=args.experts, top_k=args.top_k, granularity=args.granularity,
        shared_experts=args.shared, strategy=args.strategy, scoring_func=args.scoring_func,
        router_init=args.router_init, drop_ratio=args.drop_ratio, shared_selection=args.shared_selection,
        shared_expert_gate=args.shared_expert_gate, scale_on=args.scale_on, n_group=args.n_group,
        topk_group=args.topk_group, first_k_dense_replace=args.first_k_dense_replace,
        moe_layer_freq=args.moe_layer_freq, router_bias_update_rate=args.router_bias_update_rate,
        probe=not args.no_probe, probe_texts=args.probe_text or None, overwrite=args.overwrite, seed=args.seed,
        max_shard_size=args.max_shard_size, base_model=args.base_model,
    )
    print(report)


def _convert(args: argparse.Namespace) -> None:
    from .conversion.convert import convert

    print(convert(args.src, args.out, to=args.to, overwrite=args.overwrite))


def _select_experts(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .training.data import load_local_texts
    from .training.expert_selection import save_expert_selection, select_experts

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = load_local_texts(args.data, column=args.text_column)
    selection = select_experts(model, texts, criterion=args.criterion, threshold=args.threshold,
                               tokenizer=tokenizer, max_tokens=args.max_tokens, max_length=args.max_length)
    if args.output:
        save_expert_selection(selection, args.output, criterion=args.criterion, threshold=args.threshold,
                              model=args.model, data=args.data)
    print(json.dumps({str(layer): experts for layer, experts in selection.items()}))


def _publish(args: argparse.Namespace) -> None:
    from .hub import push_to_hub, save_for_hub

    options = dict(remote_code=not args.no_remote_code, license=args.license, base_model=args.base_model,
                   max_shard_size=args.max_shard_size)
    if args.push:
        print(push_to_hub(args.model, args.push, **options))
    else:
        save_for_hub(args.model, args.out, overwrite=args.overwrite, **options)
        print(f"Hub-ready folder written to {args.out}")


def _analyze(args: argparse.Namespace) -> None:
    from .analysis import analyze

    try:
        analyze(args.model, args.data or [], output_dir=args.output, checkpoints=args.checkpoints or [],
                capacity_factor=args.capacity_factor, max_tokens=args.max_tokens, seq_len=args.seq_len,
                batch_size=args.batch_size, num_buckets=args.buckets, tokenizer=args.tokenizer, device=args.device,
                plots=not args.no_plots)
    except ImportError as error:  # matplotlib missing: the message names the extra (or --no-plots)
        raise SystemExit(f"hf-moe analyze: {error} Or pass --no-plots for the tables only.") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe", description="DeepSeek-style MoE models for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain a tiny DeepSeek-V3-style model offline, save, reload, generate")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few steps")
    p.add_argument("--analyze", action="store_true", help="save checkpoints, then run `hf-moe analyze` on the model")
    p.set_defaults(func=_demo)

    p = sub.add_parser("inspect", help="parameters total/active, per part, and the routing of a model")
    p.add_argument("path", nargs="?", help="a model folder (config.json)")
    p.add_argument("--preset", help="a preset name, e.g. deepseek-v3")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("upcycle", help="dense checkpoint (Llama, Mistral, Qwen2/3) -> MoE, same function")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--granularity", type=int, default=1, help="shards per FFN copy (fine-grained upcycling)")
    p.add_argument("--shared", type=int, default=0, help="shards of the FFN kept as shared experts")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES, help="default: from the other options")
    p.add_argument("--scoring-func", default="sigmoid", choices=SCORING_FUNCS)
    p.add_argument("--router-init", default="random", choices=ROUTER_INITS)
    p.add_argument("--drop-ratio", type=float, default=0.0, help="Drop-Upcycling re-initialised fraction")
    p.add_argument("--shared-selection", default="first", choices=SHARED_SELECTIONS)
    p.add_argument("--shared-expert-gate", action="store_true", help="Qwen2-MoE-style sigmoid-gated shared expert")
    p.add_argument("--scale-on", default="down_proj", choices=SCALE_TARGETS)
    p.add_argument("--n-group", type=int, default=1)
    p.add_argument("--topk-group", type=int, default=1)
    p.add_argument("--first-k-dense-replace", type=int, default=0, help="keep the first k layers dense")
    p.add_argument("--moe-layer-freq", type=int, default=1)
    p.add_argument("--router-bias-update-rate", type=float, default=1e-3)
    p.add_argument("--probe-text", action="append", help="probe/router-init text (repeatable)")
    p.add_argument("--no-probe", action="store_true", help="skip the function-preservation measurement")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--base-model", default=None, help="Hub id recorded as base_model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_upcycle)

    p = sub.add_parser("convert", help="MoE checkpoints of other families <-> hf_moe")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--to", default=None, help="target family (deepseek_v3, mixtral, ...); default hf_moe")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_convert)

    p = sub.add_parser("select-experts", help="ESFT: the experts a task uses, per layer, as JSON")
    p.add_argument("model")
    p.add_argument("data", help="a local .txt (one sample per line) or .json/.jsonl file")
    p.add_argument("--text-column", default="text")
    p.add_argument("--criterion", default="gate", choices=["gate", "token"])
    p.add_argument("--threshold", type=float, default=None, help="cumulative share p (0.1 gate / 0.2 token)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop scoring after this many tokens")
    p.add_argument("--max-length", type=int, default=512, help="truncate each sample to this many tokens")
    p.add_argument("--output", default=None, help="write the selection JSON here")
    p.set_defaults(func=_select_experts)

    p = sub.add_parser("publish", help="write a Hub-ready folder (card, shards, remote code)")
    p.add_argument("model", help="a saved hf_moe model folder")
    p.add_argument("out", nargs="?", help="the folder to write (not needed with --push)")
    p.add_argument("--push", metavar="REPO_ID", help="upload to this Hub repository instead")
    p.add_argument("--license", default=None)
    p.add_argument("--base-model", default=None)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--no-remote-code", action="store_true", help="leave the modeling code out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_publish)

    p = sub.add_parser("analyze", help="what the routers learned: specialisation, co-activation, drops (report + PNGs)")
    p.add_argument("model", help="a model folder hf_moe loads (hf_moe, or an MoE family it converts)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files, one per domain")
    p.add_argument("--checkpoints", nargs="+", metavar="DIR", help="earlier checkpoints of the run, in order")
    p.add_argument("--capacity-factor", type=float, default=None, help="for the drops (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=20_000, help="tokens traced per data file (default 20000)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default min(256, max positions))")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (= one capacity group)")
    p.add_argument("--buckets", type=int, default=8, help="position buckets")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="outputs/analysis", help="folder for report.md, analysis.json, PNGs")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    p.set_defaults(func=_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"hf-moe {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
