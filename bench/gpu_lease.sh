#!/usr/bin/env bash
# One GPU lease in one command: install the project, check the kernels on CUDA, time them.
#
#   bash bench/gpu_lease.sh                      # kernels only, <= 8 minutes from a cold machine
#   bash bench/gpu_lease.sh --with-end-to-end    # also bench/end_to_end.py --lease, same 8 minutes
#   bash bench/gpu_lease.sh --dry-run            # on the CPU: each script walks its plan, no CUDA
#
# bench/README.md gives the exact `run` call (carry, timeout_s). Results are JSON lines under $OUT
# (else bench/results/lease), written as they come, so a call cut short still returns them; the
# log is $OUT/gpu_lease.log; the last lines printed are a short summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    ""|--with-end-to-end) ;;
    --dry-run)
        # The plans the lease would run, with their compile counts and time estimates.
        set -e
        python3 bench/kernel_check.py --dry-run
        python3 bench/kernels.py --lease --dry-run
        python3 bench/end_to_end.py --lease --blocks 8 --dry-run --out "${TMPDIR:-/tmp}/gpu-lease-dry-run"
        exit 0 ;;
    *) echo "gpu_lease.sh: unknown argument '$1' (use --with-end-to-end or --dry-run)" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/results/lease}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
# A fresh cache: compile counts are those of a cold start, and kernel_check reads the cubins' SASS.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/clq-triton-cache}
start=$(date +%s)
say() { echo "[gpu_lease +$(( $(date +%s) - start ))s] $*"; }

lease() {
    # Seconds: (hard limit, budget after which a script starts nothing new) per step.
    CHECK_LIMIT=240 CHECK_BUDGET=190 SPEED_LIMIT=200 SPEED_BUDGET=150 E2E_LIMIT=0 E2E_BUDGET=0
    if [ "${1:-}" = "--with-end-to-end" ]; then
        CHECK_LIMIT=130 CHECK_BUDGET=90 SPEED_LIMIT=130 SPEED_BUDGET=90 E2E_LIMIT=180 E2E_BUDGET=150
    fi

    say "machine"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv \
        | tee "$OUT/nvidia-smi.csv"
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

    if ls .whl/*.whl >/dev/null 2>&1; then
        say "carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { say "installing the carried wheels failed"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    say "pip install -e ."
    # Should the install fail, the scripts still import the project from this checkout (bench/lease.py).
    python3 -m pip install -q --no-deps --no-build-isolation -e . \
        || say "installing the project failed: going on with the checkout imported uninstalled"

    say "kernel_check (limit ${CHECK_LIMIT}s)"
    timeout "$CHECK_LIMIT" python3 bench/kernel_check.py --out "$OUT" --budget-s "$CHECK_BUDGET"
    check=$?
    say "kernels --lease (limit ${SPEED_LIMIT}s)"
    timeout "$SPEED_LIMIT" python3 bench/kernels.py --lease --out "$OUT" --budget-s "$SPEED_BUDGET"
    speed=$?
    e2e=0
    if [ "$E2E_LIMIT" -gt 0 ]; then
        say "end_to_end --lease (limit ${E2E_LIMIT}s)"
        # 8 of PixArt-Σ's 28 blocks: three Inductor compiles of all 28 would not fit beside the kernels.
        timeout "$E2E_LIMIT" python3 bench/end_to_end.py --lease --blocks 8 --out "$OUT" --budget-s "$E2E_BUDGET"
        e2e=$?
    fi
    say "exit codes: kernel_check $check, kernels $speed, end_to_end $e2e (124: hit its limit)"
    python3 bench/lease.py "$OUT"
    [ "$check" -eq 0 ] && [ "$speed" -eq 0 ] && [ "$e2e" -eq 0 ]
}

lease "$@" 2>&1 | tee -a "$OUT/gpu_lease.log"
exit "${PIPESTATUS[0]}"
