#!/usr/bin/env bash
# Installs the CPU model stack (torch CPU build + the model backends) into the
# active virtual environment, for CI and development machines.
#
#   . .venv/bin/activate && scripts/install_model_backends.sh
#
# torch goes in first, pinned, on its own; every later install runs with the
# installed torch (and numpy) as constraints, so that no dependency resolution
# can replace the CPU build with a CUDA wheel from the registry. The GPU image
# installs its CUDA torch first and may run this script on top unchanged.
#
# Idempotent: a second run finds everything satisfied and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip_install() {
  "$PYTHON" -m pip install -q "$@"
}

# --- torch ----------------------------------------------------------------------
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  pip_install "torch==${TORCH_VERSION}"
fi

# Pin what is installed now (e.g. torch==2.13.0+cpu) for every later step.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$PYTHON" - "$CONSTRAINTS" <<'EOF'
import sys
from importlib.metadata import version

with open(sys.argv[1], "w") as out:
    for name in ("torch", "numpy"):
        out.write(f"{name}=={version(name)}\n")
EOF

# --- transformers backend (MusicGen) --------------------------------------------
# The `transformers` extra of pyproject.toml, with torch held by the constraints.
# transformers >= 4.56 for `from_pretrained(dtype=...)`; sentencepiece for the
# real T5 tokenizer of the published checkpoints (tiny test models use ByT5).
pip_install -c "$CONSTRAINTS" "transformers>=4.56" "sentencepiece>=0.2" "huggingface_hub>=0.34"
"$PYTHON" -c "import torch, transformers; from transformers import MusicgenForConditionalGeneration" \
  || { echo "install_model_backends: transformers backend does not import" >&2; exit 1; }

# --- audiocraft backend ---------------------------------------------------------
# audiocraft itself goes in with --no-deps; the script says why.
PYTHON="$PYTHON" bash scripts/install_audiocraft.sh
