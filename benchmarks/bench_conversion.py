"""Conversion throughput and peak RSS: streaming `hf_moe.upcycle` vs the naive way.

The naive way loads the whole dense model with `from_pretrained`, builds the MoE state dict in memory
(`upcycle_model`, the same tensors) and calls `save_pretrained`. Ours streams one decoder layer at a time
(`hf_moe.upcycle`), with and without the function-preservation probe. Each method runs in a fresh subprocess
(clean peak RSS: `ru_maxrss`), on a generated random bf16 Llama checkpoint (~0.6 GB by default) whose files
are read once beforehand so every method starts with a warm page cache. Both outputs are checked to hold
identical tensors. Results: benchmarks/results/conversion.json.

    python benchmarks/bench_conversion.py                 # generate, measure, write the JSON
    python benchmarks/bench_conversion.py --layers 4      # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RECIPE = dict(num_experts=8, top_k=4, granularity=4)  # 2 copies of 4 shards: the routed FFN doubles
SHARD = "200MB"


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KB on Linux


class AnonPeak(threading.Thread):
    """Samples RssAnon (private memory, without file-backed pages of memory maps) every 5 ms; keeps the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mb, self.running = 0.0, True

    def run(self) -> None:
        while self.running:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("RssAnon:"):
                        self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1e3)
            time.sleep(0.005)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def generate(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> None:
    """A random bf16 Llama checkpoint written tensor by tensor (never the whole model in memory)."""
    import torch
    from transformers import LlamaConfig

    from hf_moe import MoEConfig
    from hf_moe.conversion.checkpoint_io import ShardedWriter
    from hf_moe.conversion.families import get_dense_family
    from hf_moe.conversion.tables import expected_shapes

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, dtype="bfloat16")  # fmt: skip
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    dense = MoEConfig(**get_dense_family("llama").moe_fields(config), n_routed_experts=0)  # the same keys as ours
    shapes = expected_shapes(dense)
    writer, generator = ShardedWriter(folder, SHARD), torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        writer.add(key, tensor.to(torch.bfloat16))
    writer.finish()


def child(method: str, src: str, out: str) -> None:
    """Run one conversion and print a JSON line (this process's peak RSS is the method's)."""
    import torch

    torch.set_num_threads(2)
    import hf_moe
    from hf_moe.conversion.upcycle import upcycle_model

    baseline = rss_mb()
    sampler = AnonPeak()
    sampler.start()
    start = time.perf_counter()
    if method == "naive":
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        moe = upcycle_model(dense, probe=False, **RECIPE)
        del dense
        moe.save_pretrained(out, max_shard_size=SHARD)
    else:
        hf_moe.upcycle(src, out, probe=method == "streaming+probe", max_shard_size=SHARD, progress=False, **RECIPE)
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "peak_anon_rss_mb": sampler.peak_mb, "rss_after_imports_mb": baseline}))  # fmt: skip


def measure(method: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, __file__, "--child", method, str(src), str(out)], capture_output=True,
                            text=True, check=True)  # fmt: skip
    row = json.loads(result.stdout.strip().splitlines()[-1])
    read, written = folder_bytes(src), folder_bytes(out)
    row.update(bytes_read=read, bytes_written=written, read_mb_per_s=read / 1e6 / row["seconds"],
               written_mb_per_s=written / 1e6 / row["seconds"],
               peak_rss_above_imports_mb=row["peak_rss_mb"] - row["rss_after_imports_mb"])  # fmt: skip
    print(f"{method:>16}: {row['seconds']:6.1f} s, read {row['read_mb_per_s']:6.1f} MB/s, written "
          f"{row['written_mb_per_s']:6.1f} MB/s, peak RSS {row['peak_rss_mb']:7.0f} MB "
          f"({row['peak_rss_above_imports_mb']:.0f} above imports, anonymous {row['peak_anon_rss_mb']:.0f})")  # fmt: skip
    return row


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from hf_moe.conversion.checkpoint_io import SourceCheckpoint

    with SourceCheckpoint(a) as left, SourceCheckpoint(b) as right:
        if set(left.keys()) != set(right.keys()):
            return False
        return all(torch.equal(left.get(k), right.get(k)) for k in left.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SRC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "conversion.json")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-conversion-"))
    src = work / "dense"
    try:
        if not src.exists():
            generate(src, args.layers, args.hidden, args.intermediate, args.vocab)
        for shard in src.glob("*.safetensors"):  # warm the page cache for every method alike
            shard.read_bytes()
        print(f"source: {folder_bytes(src) / 1e6:.0f} MB bf16 Llama ({args.layers} layers, hidden {args.hidden}); "
              f"recipe {RECIPE}, shards {SHARD}")  # fmt: skip
        rows = [measure(m, src, work / m) for m in ("naive", "streaming", "streaming+probe")]
        identical = same_tensors(work / "naive", work / "streaming")
        print(f"naive and streaming outputs hold identical tensors: {identical}")
        import torch
        import transformers

        result = {
            "benchmark": "dense -> MoE upcycling of a random bf16 Llama checkpoint",
            "source": {"layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.intermediate,
                       "vocab_size": args.vocab, "bytes": folder_bytes(src)},
            "recipe": RECIPE, "max_shard_size": SHARD, "outputs_identical": identical, "results": rows,
            "ratios": {"peak_rss_naive_over_streaming": rows[0]["peak_rss_mb"] / rows[1]["peak_rss_mb"],
                       "peak_rss_above_imports_naive_over_streaming":
                           rows[0]["peak_rss_above_imports_mb"] / rows[1]["peak_rss_above_imports_mb"],
                       "time_naive_over_streaming": rows[0]["seconds"] / rows[1]["seconds"]},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "threads": 2,
                        "load_average_at_end": os.getloadavg()},
        }  # fmt: skip
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
