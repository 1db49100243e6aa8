#!/usr/bin/env bash
# Installs the `audiocraft` generation backend (Meta's audiocraft 1.3.0) into the
# active Python environment, on top of the torch build that is already there.
#
#   . .venv/bin/activate && scripts/install_audiocraft.sh
#
# Why not `pip install audiocraft==1.3.0`: its metadata pins torch 2.1.0,
# xformers < 0.0.23, av 11.0.0 (source only), torchaudio/torchvision/torchtext of
# that era, spacy, gradio and demucs. Resolving that would replace our torch
# (with a CUDA build, on PyPI) and pull gigabytes that inference never touches.
# So audiocraft goes in with --no-deps, followed by exactly the packages its
# inference path imports, with the installed torch and numpy pinned as
# constraints so that pip can never swap them.
#
# Not installed on purpose (imported at start-up by audiocraft but unused by
# text-to-audio inference; core_base.backends.audiocraft_backend puts inert
# stand-ins in their place when they are missing): xformers (attention runs on
# torch's kernel), spacy (training-time tokenisation), librosa and torchaudio
# (melody chroma, loudness normalisation on write; PyPI's torchaudio wheels are
# CUDA builds that do not load next to a CPU torch). `pip check` will list
# audiocraft's unmet pins: that is expected.
#
# Idempotent: a second run finds everything satisfied and changes nothing.
set -euo pipefail

PYTHON="${PYTHON:-python}"
AUDIOCRAFT_VERSION="1.3.0"

# What inference imports, beyond torch. Lower bounds are the first releases known
# to work with torch 2.x / numpy 2; av must be a binary wheel (>= 12).
PACKAGES=(
  "av>=12"                 # audiocraft.data.audio imports it at start-up
  "einops>=0.7"
  "julius>=0.2.7"          # resampling in convert_audio
  "num2words>=0.5"         # text normalisation in the conditioners
  "omegaconf>=2.3"         # model configs inside the checkpoints
  "flashy>=0.0.2"          # utilities (pulls dora-search, colorlog)
  "huggingface_hub>=0.20"  # hf_hub_download for weights, T5 and EnCodec
  "transformers>=4.31"     # T5 text encoder, EnCodec 32 kHz (MusicGen)
  "sentencepiece>=0.1.99"  # T5 tokenizer
  "soundfile>=0.12"
  "torchmetrics>=1.0"      # audiocraft.metrics, imported with the models
)

if ! torch_version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)"; then
  echo "install_audiocraft: torch is not installed; install the build for this host first" >&2
  exit 1
fi
numpy_version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("numpy"))' 2>/dev/null || true)"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" >"$constraints"
if [[ -n "$numpy_version" ]]; then
  echo "numpy==${numpy_version}" >>"$constraints"
fi
# transformers, when present, belongs to the transformers backend: keep it.
if transformers_version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("transformers"))' 2>/dev/null)"; then
  echo "transformers==${transformers_version}" >>"$constraints"
fi

started_s=$SECONDS
"$PYTHON" -m pip install --quiet --no-deps "audiocraft==${AUDIOCRAFT_VERSION}"
"$PYTHON" -m pip install --quiet -c "$constraints" "${PACKAGES[@]}"

# AudioCraft's YAML configs ship in the sdist only; the tiny test models
# (core_base.backends.tiny_audiocraft) are composed from them.
config_dir="$("$PYTHON" -c 'import sys; print(sys.prefix)')/share/audiocraft/config"
if [[ ! -f "$config_dir/config.yaml" ]]; then
  sdist_dir="$(mktemp -d)"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "audiocraft==${AUDIOCRAFT_VERSION}" -d "$sdist_dir"
  "$PYTHON" - "$sdist_dir" "$config_dir" <<'PY'
import pathlib, shutil, sys, tarfile
sdist, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with tarfile.open(next(sdist.glob("audiocraft-*.tar.gz"))) as tar:
    tar.extractall(sdist, filter="data")
staging = target.with_name(target.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
shutil.copytree(next(sdist.glob("audiocraft-*/config")), staging)
shutil.rmtree(target, ignore_errors=True)
target.parent.mkdir(parents=True, exist_ok=True)
staging.rename(target)
PY
  rm -rf "$sdist_dir"
fi

# Prove the install: audiocraft's model classes import (through our loader, which
# supplies the stand-ins above) when the service package is installed here.
if "$PYTHON" -c 'import core_base' 2>/dev/null; then
  "$PYTHON" -c 'from core_base.backends.audiocraft_backend import import_audiocraft; import_audiocraft()'
else
  "$PYTHON" -c 'import audiocraft.models.loaders'
fi
echo "install_audiocraft: audiocraft ${AUDIOCRAFT_VERSION} ready on torch ${torch_version} ($((SECONDS - started_s)) s)"
