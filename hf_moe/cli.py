"""The `hf-moe` command. Each subcommand parses its arguments and makes one library call.

User errors are one line on stderr (`hf-moe: error: ...`) and exit code 2 (1 for an unexpected error, 130 after
Ctrl-C, 143 after SIGTERM, which is handled like Ctrl-C so that half-written outputs are removed); `--debug` or
HF_MOE_DEBUG=1 adds the traceback. Option values are checked when parsed (`cli_types`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from .cli_types import fraction, positive_float, positive_int, shard_size, user_error_message
from .conversion.tables import LAYOUTS
from .conversion.upcycle_recipe import UpcycleRecipe


def _model_folder(path: str, model_types: Sequence[str] = ("hf_moe",)) -> Path:
    """`path` checked to be a saved model folder whose config.json has one of `model_types`."""
    from .files import read_json

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: expected a saved model folder (with config.json).")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model folder.")
    model_type = read_json(config).get("model_type")
    if model_type not in model_types:
        raise ValueError(f"{config} has model_type={model_type!r}: expected {' or '.join(map(repr, model_types))} "
                         "(convert other MoE families with `hf-moe convert`, dense models with `hf-moe upcycle`).")
    return folder


def _inspect(args: argparse.Namespace) -> None:
    from .inspection import count_parameters, format_parameter_report
    from .modeling.configuration import MoEConfig

    if (args.preset is None) == (args.path is None):
        raise ValueError("give exactly one of DIR or --preset NAME.")
    config = MoEConfig.from_preset(args.preset) if args.preset else MoEConfig.from_pretrained(_model_folder(args.path))
    print(format_parameter_report(count_parameters(config), config))


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.output_dir, max_steps=args.max_steps, quick=args.quick, analyze=args.analyze)


def _upcycle(args: argparse.Namespace) -> None:
    from .conversion.upcycle import upcycle

    recipe = UpcycleRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(UpcycleRecipe)})
    report = upcycle(
        args.src, args.out, recipe, probe=not args.no_probe, probe_texts=args.probe_text or None,
        overwrite=args.overwrite, max_shard_size=args.max_shard_size, base_model=args.base_model,
        remote_code=not args.no_remote_code,
    )
    print(report)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass `cls`: `--field-name` (or the field's metadata "flag"), its type,
    default (required when it has none), "choices" and "help" from its metadata; a bool field that defaults to
    False is a switch."""
    hints = typing.get_type_hints(cls)
    for option in dataclasses.fields(cls):
        flag = option.metadata.get("flag", "--" + option.name.replace("_", "-"))
        kind = hints[option.name]
        settings: dict = dict(dest=option.name, help=option.metadata.get("help"))
        if option.default is dataclasses.MISSING:
            settings["required"] = True
        else:
            settings["default"] = option.default
        if kind is bool and option.default is False:
            parser.add_argument(flag, action="store_true", **settings)
            continue
        parser.add_argument(flag, type=kind, choices=option.metadata.get("choices"), **settings)


def _convert(args: argparse.Namespace) -> None:
    from .conversion.convert import convert

    print(convert(args.src, args.out, to=args.to, layout=args.layout, max_shard_size=args.max_shard_size,
                  overwrite=args.overwrite, remote_code=not args.no_remote_code))


def _select_experts(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conversion.checkpoint_io import TOKENIZER_FILES, tokenizer_files
    from .training.data import load_local_texts
    from .training.expert_selection import save_expert_selection, select_experts

    if not tokenizer_files(_model_folder(args.model)):
        raise FileNotFoundError(f"{args.model} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...): "
                                "save the model's tokenizer into that folder (tokenizer.save_pretrained).")
    texts = load_local_texts(args.data, column=args.text_column)  # a bad data file fails before the model loads
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    selection = select_experts(model, texts, criterion=args.criterion, threshold=args.threshold,
                               tokenizer=tokenizer, max_tokens=args.max_tokens, max_length=args.max_length)
    if args.output:
        save_expert_selection(selection, args.output, criterion=args.criterion, threshold=args.threshold,
                              model=args.model, data=args.data)
    print(json.dumps({str(layer): experts for layer, experts in selection.items()}))


def _publish(args: argparse.Namespace) -> None:
    from .hub import push_to_hub, save_for_hub

    if (args.out is None) == (args.push is None):
        raise ValueError("give exactly one of OUT (a folder to write) or --push REPO_ID.")
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


class _Parser(argparse.ArgumentParser):
    """argparse's parser with usage errors on one line, like every other error of the command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("hf-moe").strip()
        self.exit(2, f"hf-moe: error: {command + ': ' if command else ''}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-moe", description="DeepSeek-style MoE models for transformers.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or HF_MOE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain a tiny DeepSeek-V3-style model offline, save, reload, generate")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--max-steps", type=positive_int, default=None, help="training steps (default: the demo's own)")
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
    add_dataclass_arguments(p, UpcycleRecipe)  # the recipe: one flag per UpcycleRecipe field
    p.add_argument("--probe-text", action="append", help="probe/router-init text (repeatable)")
    p.add_argument("--no-probe", action="store_true", help="skip the function-preservation measurement")
    p.add_argument("--max-shard-size", type=shard_size, default="2GB")
    p.add_argument("--base-model", default=None, help="Hub id recorded as base_model")
    p.add_argument("--no-remote-code", action="store_true",
                   help="leave out the modeling code + auto_map (trust_remote_code loading without hf_moe)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_upcycle)

    p = sub.add_parser("convert", help="MoE checkpoints of other families <-> hf_moe")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--to", default=None, help="target family (deepseek_v3, mixtral, ...); default hf_moe")
    p.add_argument("--layout", default="original", choices=LAYOUTS,
                   help="exports: the released checkpoints' per-expert keys, or transformers' fused tensors")
    p.add_argument("--max-shard-size", type=shard_size, default="2GB")
    p.add_argument("--no-remote-code", action="store_true",
                   help="hf_moe outputs: leave out the modeling code + auto_map (exports never carry it)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_convert)

    p = sub.add_parser("select-experts", help="ESFT: the experts a task uses, per layer, as JSON")
    p.add_argument("model")
    p.add_argument("data", help="a local .txt (one sample per line) or .json/.jsonl file")
    p.add_argument("--text-column", default="text")
    p.add_argument("--criterion", default="gate", choices=["gate", "token"])
    p.add_argument("--threshold", type=fraction, default=None, help="cumulative share p (0.1 gate / 0.2 token)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="stop scoring after this many tokens")
    p.add_argument("--max-length", type=positive_int, default=512, help="truncate each sample to this many tokens")
    p.add_argument("--output", default=None, help="write the selection JSON here")
    p.set_defaults(func=_select_experts)

    p = sub.add_parser("publish", help="write a Hub-ready folder (card, shards, remote code)")
    p.add_argument("model", help="a saved hf_moe model folder")
    p.add_argument("out", nargs="?", help="the folder to write (not needed with --push)")
    p.add_argument("--push", metavar="REPO_ID", help="upload to this Hub repository instead")
    p.add_argument("--license", default=None)
    p.add_argument("--base-model", default=None)
    p.add_argument("--max-shard-size", type=shard_size, default="5GB")
    p.add_argument("--no-remote-code", action="store_true", help="leave the modeling code out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_publish)

    p = sub.add_parser("analyze", help="what the routers learned: specialisation, co-activation, drops (report + PNGs)")
    p.add_argument("model", help="a model folder hf_moe loads (hf_moe, or an MoE family it converts)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files, one per domain")
    p.add_argument("--checkpoints", nargs="+", metavar="DIR", help="earlier checkpoints of the run, in order")
    p.add_argument("--capacity-factor", type=positive_float, default=None, help="for the drops (default: the model's)")
    p.add_argument("--max-tokens", type=positive_int, default=20_000, help="tokens traced per data file (default 20000)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default min(256, max positions))")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward (= one capacity group)")
    p.add_argument("--buckets", type=positive_int, default=8, help="position buckets")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="outputs/analysis", help="folder for report.md, analysis.json, PNGs")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    p.set_defaults(func=_analyze)
    for command in sub.choices.values():  # `hf-moe CMD ... --debug` works too (SUPPRESS: no default to override)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .files import Terminated, terminate_as_interrupt

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("HF_MOE_DEBUG", "").lower() not in ("", "0", "false", "no")
    try:
        with terminate_as_interrupt():
            args.func(args)
    except KeyboardInterrupt as error:
        if debug:
            import traceback

            traceback.print_exc()
        terminated = isinstance(error, Terminated)
        print(f"hf-moe: {'terminated' if terminated else 'interrupted'}: unfinished output folders were removed, "
              "earlier ones are as they were.", file=sys.stderr)  # fmt: skip
        return 143 if terminated else 130
    except Exception as error:
        if debug:
            import traceback

            traceback.print_exc()
        message, code = user_error_message(error)
        print(f"hf-moe: error: {args.command}: {message}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
