"""GPU pieces of benchmarks/run.py: the larger config, the peak FLOP/s that MFU is measured against, what the GPU
and its software are, and which third-party MoE kernels could have run.

MFU (model FLOPs utilisation) = model FLOPs of a training step (6 x active parameters x tokens + attention,
`run.train_flops`) / step time / the GPU's dense peak. The peaks are the vendor datasheet's dense (no sparsity)
tensor-core rates of the SXM parts: H100 SXM and H200 SXM 989 TFLOP/s bf16/fp16, 67 TFLOP/s fp32 without TF32
(nvidia-smi names them "NVIDIA H100 80GB HBM3" and "NVIDIA H200"; PCIe and NVL parts have lower peaks). Other GPUs
get no MFU unless `--peak-flops` names the peak.
"""

from __future__ import annotations

import importlib.util
import subprocess

import torch

DATASHEET_PEAKS = {  # (name fragment, dtype) -> dense FLOP/s, SXM parts
    ("H100", torch.bfloat16): 989e12, ("H100", torch.float16): 989e12, ("H100", torch.float32): 67e12,
    ("H200", torch.bfloat16): 989e12, ("H200", torch.float16): 989e12, ("H200", torch.float32): 67e12,
}


# A config big enough for a GPU to say something, still fast to build and time (DeepSeek-V2-Lite's widths,
# fewer layers): vocab 32768, hidden 2048, 6 layers (1 dense, intermediate 10944), 16 heads, MLA q_lora 1536 /
# kv_lora 512 / rope 64 / nope 128 / v 128, 64 routed experts top-6 of width 1408 in 8 groups (top 4), 2 shared.
# ~3.2B parameters, ~0.57B active per token (`run.bench_config(**GPU_CONFIG)`).
GPU_CONFIG: dict[str, object] = dict(
    vocab_size=32768, hidden_size=2048, intermediate_size=10944, num_hidden_layers=6, num_attention_heads=16,
    q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408, n_shared_experts=2,
    first_k_dense_replace=1, n_group=8, topk_group=4, routed_scaling_factor=2.5, max_position_embeddings=16384,
)


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> tuple[float | None, str]:
    """(dense peak FLOP/s, where it comes from) for MFU; (None, reason) where no peak is known."""
    if override:
        return override, f"--peak-flops {override:.4g}"
    if device.type != "cuda":
        return None, "no GPU"
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name or "NVL" in name:  # lower clocks and power than the SXM parts: other peaks
        return None, f"no datasheet peak known for {name} (pass --peak-flops)"
    for (fragment, peak_dtype), peak in DATASHEET_PEAKS.items():
        if fragment in name and peak_dtype == dtype:
            return peak, (f"{fragment} SXM datasheet dense {str(dtype).removeprefix('torch.')} peak "
                          f"{peak / 1e12:.0f} TFLOP/s")
    return None, f"no datasheet peak known for {name} in {dtype} (pass --peak-flops)"


def gpu_facts(device: torch.device) -> dict[str, object]:
    """The GPU, its driver and the CUDA software that ran the benchmark."""
    props = torch.cuda.get_device_properties(device)
    facts: dict[str, object] = {
        "gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}", "gpu_sms": props.multi_processor_count,
        "gpu_memory_bytes": props.total_memory, "torch_cuda": torch.version.cuda,
    }
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                 "--format=csv,noheader"]
        facts["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        facts["nvidia_smi"] = "unavailable"
    if importlib.util.find_spec("triton") is not None:
        import triton

        facts["triton"] = triton.__version__
    return facts


def third_party_kernels(device: torch.device) -> dict[str, str]:
    """Whether sonic-moe (the Hub's `kernels` package, through transformers) and DeepGEMM could run here."""
    found = {}
    if importlib.util.find_spec("kernels") is None:
        found["sonicmoe"] = "not run: the Hub `kernels` package is not installed"
    else:
        try:
            from transformers.integrations.sonicmoe import is_sonicmoe_loadable

            loadable = device.type == "cuda" and bool(is_sonicmoe_loadable())
        except Exception as error:  # noqa: BLE001 - any failure to load means "not here"
            loadable, error_text = False, f"{type(error).__name__}: {error}"
        else:
            error_text = "is_sonicmoe_loadable() is False (it downloads from the Hub)"
        found["sonicmoe"] = "loadable (hf_moe_auto uses it for bf16 training/prefill)" if loadable else f"not run: {error_text}"
    found["deep_gemm"] = ("installed, not wired into this benchmark" if importlib.util.find_spec("deep_gemm")
                          else "not run: deep_gemm is not installed")
    return found


def copy_bandwidth_cuda(device: torch.device, megabytes: int = 1024, rounds: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write), timed with CUDA events; the best of `rounds`."""
    src = torch.empty(megabytes * 2**20 // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / best
