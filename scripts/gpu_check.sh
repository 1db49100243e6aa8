#!/usr/bin/env bash
# The checks that need an NVIDIA GPU. CI has none, so they are run by hand in a
# checkout on a GPU host, with the model stack and the dev extras installed over
# a CUDA build of torch (`scripts/install.sh --models` after installing that torch
# into .venv; the GPU image holds neither the tests nor pytest):
#
#   scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: ./gpu-check
#   PYTHON=python3 scripts/gpu_check.sh   # another interpreter than .venv's
#
# 1. tests/models on the device the backends pick in production (CUDA, bf16 on
#    the transformers backend, AudioCraft's own autocast on the audiocraft one);
# 2. scripts/model_smoke.py: `dev` end to end on tiny models, both loaded on CUDA;
# 3. bench/models.py on CUDA for the small and medium decoder shapes (random
#    weights cost what real ones do), into OUT_DIR/RESULTS.md; copy the sections
#    into bench/RESULTS.md.
# Every step runs even when one before it failed; the exit status says whether
# any failed. Logs: OUT_DIR/*.log.
set -uo pipefail
OUT="$(realpath -m "${1:-gpu-check}")"  # relative to where it is run from
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

step() {
  local name="$1"
  shift
  echo "== $name: $*"
  local started=$SECONDS
  if "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "== $name: passed in $((SECONDS - started)) s"
  else
    echo "== $name: FAILED in $((SECONDS - started)) s (log: $OUT/$name.log)"
    failed+=("$name")
  fi
}

if ! "$PYTHON" -c 'import torch'; then
  echo "gpu_check: $PYTHON cannot import torch" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device (a CPU build of torch, or no driver)" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(0))'

# --noconftest: the model tests need none of the infrastructure fixtures.
step model-tests "$PYTHON" -m pytest tests/models -q -p no:cacheprovider --noconftest
smoke_dir="$(mktemp -d)"  # models and files stay out of OUT_DIR: only the dev log goes there
step model-smoke "$PYTHON" scripts/model_smoke.py --expect-device cuda --work-dir "$smoke_dir"
cp "$smoke_dir/dev.log" "$OUT/model-smoke-dev.log" 2>/dev/null || true
rm -rf "$smoke_dir"
step bench-small "$PYTHON" bench/models.py --device cuda --duration-s 10 \
  --batch-sizes 1,4,16,32,64 --results "$OUT/RESULTS.md"
step bench-medium "$PYTHON" bench/models.py --device cuda --duration-s 10 --layers 48 \
  --hidden 1536 --batch-sizes 1,4,16,32,64 --results "$OUT/RESULTS.md"

if ((${#failed[@]})); then
  echo "gpu_check: failed: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all passed"
