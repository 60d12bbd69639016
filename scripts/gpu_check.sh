#!/usr/bin/env bash
# GPU check (issue 18), one script, under 8 minutes on one H100/H200:
#   1. environment: carried wheels (.whl/, if present) installed to /tmp/site, versions and the GPU printed;
#   2. the GPU-marked tests (`pytest -m gpu`) and tests/kernels/test_triton.py (Triton compiled for real on CUDA);
#   3. benchmarks/run.py --device cuda --dtype bfloat16 on the larger GPU config (results gpu.md / gpu.json), then
#      the speed issue's small config (gpu_small.*) if time is left.
# Without a CUDA GPU (CI, a laptop) it runs the same steps on its CPU fallback: the GPU tests skip with a reason,
# the Triton tests run under the interpreter, and a tiny CPU smoke of the benchmark runs instead (its results are
# not kept); it exits 0 when nothing failed.
#
#   bash scripts/gpu_check.sh                 # logs and results to $OUT (default benchmarks/results)
#   OUT=/tmp/x GPU_CHECK_BUDGET=400 PYTHON=python3 bash scripts/gpu_check.sh
#   bash scripts/gpu_check.sh fetch-wheels    # on a machine with pip access: download into .whl/ (git-ignored)
#                                             # the wheels a Python 3.12 GPU image with transformers 5.17 lacks
#
# hf_moe is imported from this checkout (PYTHONPATH), nothing is pip-installed into the system, and no step
# needs the `hf-moe` console script or the network (HF_HUB_OFFLINE=1).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
# transformers >= 5.24 and what it needs that the lent H200 image (torch 2.11, transformers 5.17, hub 1.33) lacks
WHEELS="transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 accelerate==1.16.0 peft==0.21.2
regex==2026.11.19 tqdm==4.70.1 click==8.5.1 truststore==0.10.5 idna==3.20 anyio==4.16.0 h11==0.16.0
typing_extensions==4.16.0"
if [ "${1:-}" = "fetch-wheels" ]; then
    EXCLUDE=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$EXCLUDE")" .whl
    grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
    # shellcheck disable=SC2086  # one argument per requirement
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
fi
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-400}  # seconds for the whole script; each step gets what is left
OUT=${OUT:-$REPO/benchmarks/results}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1  # the whole log lands in $OUT, also if the script is killed
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
STATUS=0
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() { echo; echo "=== [$(( $(date +%s) - START )) s] $*"; }

step "1. environment"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [ "${GPU_CHECK_NO_WHEELS:-0}" != 1 ] && compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    echo "installing carried wheels to /tmp/site: $(cd "$REPO/.whl" && ls -- *.whl | tr '\n' ' ')"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$REPO"/.whl/*.whl; then
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    else
        echo "the wheels do not install for $("$PYTHON" -V 2>&1) here: using the installed packages"
    fi
else
    echo "no carried wheels (.whl/): using the installed packages"
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
    --format=csv
"$PYTHON" - <<'EOF' || { echo "FAILED: the environment cannot import hf_moe (see above)"; exit 1; }
import sys
import torch, transformers, huggingface_hub
from packaging.version import Version
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
if Version(transformers.__version__) < Version("5.24"):
    sys.exit(f"transformers {transformers.__version__} is too old: hf_moe needs >= 5.24 (carry wheels in .whl/)")
import hf_moe
print(f"hf_moe {hf_moe.__version__} from {hf_moe.__file__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
else:
    print("no CUDA GPU: CPU fallback (GPU tests skip, the benchmark runs a CPU smoke only)")
EOF
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")

step "2. tests: pytest -m gpu, then tests/kernels/test_triton.py (log: $OUT/gpu_tests.log)"
TEST_TIME=$(( $(left) > 400 ? 200 : $(left) / 2 ))
timeout "$TEST_TIME" "$PYTHON" -m pytest -p no:cacheprovider -v -rfEs --durations=10 -m gpu tests \
    > "$OUT/gpu_tests.log" 2>&1
rc=$?; grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -n 60; echo "pytest -m gpu: exit $rc"; [ $rc -eq 0 ] || STATUS=1
TRITON_TIME=$(( $(left) > 300 ? 120 : $(left) / 3 ))
timeout "$TRITON_TIME" "$PYTHON" -m pytest -p no:cacheprovider -v -rfEs tests/kernels/test_triton.py \
    >> "$OUT/gpu_tests.log" 2>&1
rc=$?; tail -n 12 "$OUT/gpu_tests.log"; echo "pytest tests/kernels/test_triton.py: exit $rc"
[ $rc -eq 0 ] || [ $rc -eq 5 ] || STATUS=1  # 5: nothing collected (triton not installed)

step "3. benchmark"
if [ "$HAS_CUDA" = 1 ]; then
    RESULTS=$REPO/benchmarks/results
    BENCH=$(( $(left) - 20 ))
    if [ "$BENCH" -gt 60 ]; then
        # larger config: batch 4 x 2048 tokens for the MoE layer and training step; stop new parts at 60% of the time
        timeout "$BENCH" "$PYTHON" benchmarks/run.py --device cuda --dtype bfloat16 --config gpu --batch 4 \
            --length 2048 --rounds 5 --decode-rounds 8 --threads 8 --name gpu --out-dir "$RESULTS" \
            --time-budget $(( BENCH * 6 / 10 ))
        rc=$?; echo "benchmarks/run.py --config gpu: exit $rc"; [ $rc -eq 0 ] || STATUS=1
    else
        echo "skipped: only $(left) s left"; STATUS=1
    fi
    SMALL=$(( $(left) - 10 ))
    if [ "$SMALL" -gt 50 ]; then
        timeout "$SMALL" "$PYTHON" benchmarks/run.py --device cuda --dtype bfloat16 --config issue --rounds 5 \
            --decode-rounds 8 --threads 8 --name gpu_small --out-dir "$RESULTS" --time-budget $(( SMALL / 2 ))
        rc=$?; echo "benchmarks/run.py --config issue: exit $rc"
    else
        echo "the small-config run is skipped: $(left) s left"
    fi
    if [ "$(cd "$OUT" && pwd)" != "$(cd "$RESULTS" && pwd)" ]; then
        for f in gpu.md gpu.json gpu_small.md gpu_small.json; do [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"; done
    fi
else
    echo "no CUDA GPU: the GPU benchmark is not run (GPU numbers not measured); a tiny CPU smoke of benchmarks/run.py"
    echo "checks that it runs end to end (results in a temporary folder, not kept)"
    SMOKE=$(mktemp -d)
    timeout $(( $(left) > 30 ? $(left) - 10 : 20 )) "$PYTHON" benchmarks/run.py --parts moe,train,decode \
        --contexts 64 --batch 1 --length 32 --rounds 1 --decode-rounds 2 --max-busy 1 --name cpu_smoke \
        --out-dir "$SMOKE" > "$SMOKE/log" 2>&1
    rc=$?; tail -n 25 "$SMOKE/log"; echo "benchmark CPU smoke: exit $rc"; [ $rc -eq 0 ] || STATUS=1
    rm -rf "$SMOKE"
fi

step "done: exit $STATUS after $(( $(date +%s) - START )) s"
exit $STATUS
