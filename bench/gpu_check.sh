#!/usr/bin/env bash
# The one GPU check: on a fresh H100/H200 machine holding only this repo (plus wheels in .whl/,
# see the device README), build ernie_core._C with the CUDA kernels, run every GPU test, run the
# kernel benchmarks, and write ONE JSON file: $OUT/gpu_check.json (or bench/results/ without $OUT).
# Budget: under 8 minutes; each step has its own timeout, so a hung step costs its slot only and
# the JSON is always written.
#
#   bash bench/gpu_check.sh            # device call: carry [".whl"]; wheels: nvidia-cutlass
#   GPU_CHECK_QUICK=1 bash bench/gpu_check.sh   # S=8K only, for a rerun with little time left
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
T0=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
declare -A STATUS

step() {  # step NAME TIMEOUT_S CMD...: run, log to $RESULTS/NAME.log, remember the exit code
  local name=$1 limit=$2; shift 2
  log "$name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  STATUS[$name]=$?
  log "$name -> rc ${STATUS[$name]}"
  tail -n 15 "$RESULTS/$name.log"
}

# 1. Wheels carried with the call (nvidia-cutlass for the CuTe headers); the image has the rest.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
CUTLASS_INC=$($PY -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))" 2>/dev/null || true)
log "cutlass: ${CUTLASS_INC:-missing}; $(nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader 2>/dev/null)"

# 2. Build with CUDA for Hopper only (faster than the default "8.0;9.0a"); setup.py finds the CuTe
#    headers through the wheel installed above ($ERNIE_CUTLASS_INCLUDE says it explicitly).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
[ -n "$CUTLASS_INC" ] && export ERNIE_CUTLASS_INCLUDE=$CUTLASS_INC
step build 300 $PY setup.py build_ext --inplace
$PY -c "import ernie_core.ops.cuda" > "$RESULTS/cuda_import.log" 2>&1 && STATUS[cuda_backend]=0 || STATUS[cuda_backend]=1

# 3. Every GPU test (CUDA and Triton kernels vs the references, bf16 and fp32).
step gpu_tests 150 $PY -m pytest -q --timeout=120 -p no:cacheprovider tests/gpu -m gpu \
  --junitxml="$RESULTS/gpu_tests.xml" -o addopts=""

# 4. Benchmarks.
SEQ="8192 32768"; [ -n "${GPU_CHECK_QUICK:-}" ] && SEQ="8192"
step bench_attention 200 $PY bench/attention_gpu.py --seqlens $SEQ --json "$RESULTS/attention.json"
step bench_head_ce 90 $PY bench/head_ce_gpu.py --json "$RESULTS/head_ce.json"

# 5. One JSON with everything.
STATUS_JSON=$(for k in "${!STATUS[@]}"; do printf '"%s": %s,' "$k" "${STATUS[$k]}"; done)
$PY - "$RESULTS" "{${STATUS_JSON%,}}" "$(( $(date +%s) - T0 ))" <<'PYEOF'
import json, os, socket, sys, time
res, status, secs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
out = {"host": socket.gethostname(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": secs, "status": status}
for name in ("attention", "head_ce"):
    path = os.path.join(res, f"{name}.json")
    out[name] = json.load(open(path)) if os.path.exists(path) else None
xml = os.path.join(res, "gpu_tests.xml")
if os.path.exists(xml):
    import xml.etree.ElementTree as ET
    s = ET.parse(xml).getroot()
    s = s if s.tag == "testsuite" else s[0]
    out["gpu_tests"] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["gpu_test_failures"] = [c.get("name") for c in s.iter("testcase") if c.find("failure") is not None][:40]
try:
    import torch
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    out["torch"] = torch.__version__
except Exception as e:
    out["device"] = f"torch import failed: {e}"
with open(os.path.join(res, "gpu_check.json"), "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps({k: out[k] for k in ("seconds", "status", "device") if k in out}))
for r in (out.get("attention") or {}).get("rows", []):
    if r.get("status") == "ok":
        print(f"attn S={r['S']:>6} {r['mask']:>12} {r['impl']:>6} {r['fwd_bwd_tflops']:7.1f} TFLOP/s "
              f"{r['pct_of_peak']:5.1f}% peak" + (f"  x{r['speedup_vs_flex']:.2f} flex" if "speedup_vs_flex" in r else ""))
    else:
        print(f"attn S={r.get('S')} {r.get('mask')} {r.get('impl')}: {r.get('status')}")
for r in (out.get("head_ce") or {}).get("rows", []):
    print("head_ce", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
PYEOF
log "done"
