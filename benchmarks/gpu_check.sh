#!/usr/bin/env bash
# The GPU check on a bare CUDA machine (benchmarks/README.md "GPU check"):
#   bash benchmarks/gpu_check.sh OUT_DIR [PROFILE [gpu_check.py run options, e.g. --data DIR]]
#   (PROFILE: gpu-check (default) | gpu-check-tiny | a YAML file)
# 1. installs the carried wheels (.whl/, `make gpu-wheels`) into a private --target folder: nothing of the
#    machine's own Python changes, and the machine's torch, numpy, pandas, ... are used as they are;
# 2. runs benchmarks/gpu_check.py on the staged dev data (.gpu-data/, `make gpu-data`), which writes
#    OUT_DIR/gpu_check.json + .md (timings, scores, machine), quality.json / .md and wsss.log.
# SKIP_WHEELS=1 skips step 1 (a machine that has wsss's dependencies, e.g. the CPU check here).
set -euo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR [PROFILE]}
PROFILE=${2:-gpu-check}
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 \
       PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p "$OUT"
t0=$(date +%s)
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  SITE=${WHEEL_TARGET:-/tmp/wsss-site}
  ls .whl/*.whl >/dev/null 2>&1 || { echo "error: .whl/ has no wheels (run make gpu-wheels here, carry .whl)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
t1=$(date +%s)
echo "wheels installed in $((t1 - t0)) s"
# Every package the pipeline imports, before anything runs: a missing one fails here in seconds.
"$PY" - <<'PY'
import importlib, sys
missing = []
for m in ("torch", "torchvision", "numpy", "pandas", "pyarrow", "cv2", "PIL", "yaml", "typer", "rich", "mlflow",
          "sqlalchemy", "alembic", "optuna", "great_expectations", "segmentation_models_pytorch",
          "pydensecrf.densecrf", "safetensors", "matplotlib", "filelock", "psutil", "wsss.cli"):
    try:
        importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001 - report every missing or broken package at once
        missing.append(f"{m} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("error: cannot import " + "; ".join(missing))
import torch
print(f"imports ok; torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
PY
rc=0
"$PY" benchmarks/gpu_check.py run --out "$OUT" --profile "$PROFILE" "${@:3}" || rc=$?
echo "{\"wheels_install_seconds\": $((t1 - t0)), \"total_seconds\": $(( $(date +%s) - t0 )), \"rc\": $rc}" > "$OUT/gpu_check_wall.json"
exit $rc
