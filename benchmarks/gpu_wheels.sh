#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh installs on the GPU machine (no network there) into .whl/
# (git-ignored; it travels with the working tree through the device tool's `carry`).
#
#   benchmarks/gpu_wheels.sh            # fetch exactly the versions in benchmarks/gpu_check.lock
#   benchmarks/gpu_wheels.sh --relock   # re-resolve the lock's second block for cp312 first
#
# Needs pip with access to PyPI, and a Python 3.12 with its headers for pydensecrf2 (sdist only on PyPI):
# PY312=/path/to/python3.12 (default: python3.12 on PATH, else pyenv's). Writes .whl/MANIFEST.txt
# (every wheel, its size, the total).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=benchmarks/gpu_check.lock
DEST=${WHL_DIR:-.whl}
PIP=${PIP:-python3 -m pip}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64)
PLAT_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in "${PLATFORMS[@]}"; do PLAT_ARGS+=(--platform "$p"); done

# The lock's top block must agree with requirements/constraints.txt (one definition of each version) where
# that file pins the package (sqlalchemy and alembic, mlflow's and optuna's store, are not pinned there: the
# lock has the versions the shared venv tests with). mlflow-skinny follows the mlflow pin (the same release
# without the server's UI and extras; the SQLite store and its migrations are in it).
pinned() { { grep -i -E "^$1==" requirements/constraints.txt || true; } | head -1 | cut -d= -f3; }
top=$(sed -n '/^# their needs/q;/==/p' "$LOCK")
for spec in $top; do
  name=${spec%%==*}; ver=${spec##*==}
  want=$(pinned "$([ "$name" = mlflow-skinny ] && echo mlflow || echo "$name")")
  if [ -n "$want" ] && [ "$want" != "$ver" ]; then
    echo "error: $LOCK pins $spec but requirements/constraints.txt has $want; update the lock" >&2
    exit 2
  fi
done

if [ "${1:-}" = "--relock" ]; then
  # Resolve the top block for cp312 and keep what the GPU image lacks (device/KINDS.md's package list,
  # copied into benchmarks/gpu_check.device.txt). torch's CUDA wheels are never carried.
  tmp=$(mktemp -d)
  # shellcheck disable=SC2086
  $PIP install --dry-run --ignore-installed --quiet --report "$tmp/report.json" --target "$tmp/t" "${PLAT_ARGS[@]}" \
      $(echo "$top" | grep -v '^pydensecrf2==')
  python3 - "$tmp/report.json" "$LOCK" <<'PY'
import json, re, sys
from pathlib import Path
report, lock = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
device = {norm(l.strip()) for l in Path("benchmarks/gpu_check.device.txt").read_text().splitlines()
          if l.strip() and not l.startswith("#")}
text = lock.read_text()
head = text[: text.index("# their needs")]
top = {norm(l.split("==")[0]) for l in head.splitlines() if "==" in l}
needs = sorted(f"{i['metadata']['name'].lower()}=={i['metadata']['version']}" for i in report["install"]
               if norm(i["metadata"]["name"]) not in device | top and not norm(i["metadata"]["name"]).startswith("nvidia-"))
# typing-extensions is on the image, but pydantic and SQLAlchemy need a recent one: carry ours.
needs += [f"typing-extensions=={i['metadata']['version']}" for i in report["install"]
          if norm(i["metadata"]["name"]) == "typing-extensions"]
lock.write_text(head + "# their needs\n" + "\n".join(needs) + "\n")
print(f"{lock}: {len(top)} + {len(needs)} packages")
PY
  rm -rf "$tmp"
fi

mkdir -p "$DEST"
specs=$(grep -E '^[A-Za-z0-9].*==' "$LOCK" | grep -v '^pydensecrf2==')
# One version of each in $DEST: drop wheels the lock no longer names (two versions stop the install).
python3 - "$DEST" "$LOCK" <<'PY2'
import re, sys
from pathlib import Path
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = {norm(l.split("==")[0]) + "==" + l.split("==")[1].strip() for l in Path(sys.argv[2]).read_text().splitlines()
        if "==" in l and not l.startswith("#")}
for whl in Path(sys.argv[1]).glob("*.whl"):
    name, ver = whl.name.split("-")[:2]
    if f"{norm(name)}=={ver}" not in lock:
        print(f"removing stale {whl.name}")
        whl.unlink()
PY2
# shellcheck disable=SC2086
$PIP download --quiet --no-deps "${PLAT_ARGS[@]}" -d "$DEST" $specs

crf=$(grep '^pydensecrf2==' "$LOCK")
if ! ls "$DEST"/pydensecrf2-"${crf##*==}"-cp312-*.whl >/dev/null 2>&1; then
  py=""
  for cand in ${PY312:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then py=$cand; break; fi
  done
  if [ -z "$py" ]; then
    echo "error: no Python 3.12 to build $crf (set PY312=/path/to/python3.12)" >&2
    exit 1
  fi
  "$py" -m pip wheel --quiet --no-deps -w "$DEST" "$crf"
fi

{
  echo "# wheels for benchmarks/gpu_check.sh (cp312, x86-64), from $LOCK"
  (cd "$DEST" && ls -l -- *.whl | awk '{printf "%9d  %s\n", $5, $9}')
  echo "total: $(cat "$DEST"/*.whl | wc -c) bytes"
} > "$DEST/MANIFEST.txt"
n=$(ls "$DEST"/*.whl | wc -l)
echo "$DEST: $n wheels, $(du -sh "$DEST" | cut -f1) ($(grep -c == "$LOCK") in the lock)"
