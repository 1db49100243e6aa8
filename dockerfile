# syntax=docker/dockerfile:1.7
#
# AudioCraft Service images. One file, two targets:
#
#   cpu  small: the service with the synth backend. Runs the App API, both
#        sub-service APIs, `migrate`, and workers on CPU (docker-compose.cpu.yml).
#        --build-arg CPU_EXTRAS=transformers adds the CPU torch wheel and the
#        transformers backend (MusicGen on CPU: slow, but real).
#   gpu  the workers' image: a CUDA torch, the transformers and audiocraft
#        backends. The NVIDIA container toolkit supplies the driver at run time;
#        the CUDA libraries come inside the torch wheels, so the base stays slim.
#
#   scripts/build_dockerfile.sh builds both (tags <ECR>:audio_craft_<version>
#   for gpu, ..._cpu for cpu). Model weights are NOT baked in: they are
#   downloaded into the model-cache volume (CACHE_MODEL_DIR) and are licensed
#   CC-BY-NC 4.0 (non-commercial use only).
#
# No secret is baked in: configuration comes from the environment at run time,
# and .dockerignore keeps .env out of the build context.

ARG PYTHON_VERSION=3.11

# --- base: what every stage shares -------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A fixed uid so that volume ownership is the same on every host.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app

# --- build stages: a virtualenv with the service installed ---------------------
FROM base AS build-common
RUN python -m venv /opt/venv && pip install --no-cache-dir --upgrade pip setuptools wheel
WORKDIR /src
# README.md* : pyproject names README.md as the readme; the glob keeps the build
# working in a checkout where it is missing.
COPY pyproject.toml version.json README.md* ./
COPY core_base ./core_base
COPY app_api ./app_api
COPY audio_gen ./audio_gen
COPY music_gen ./music_gen
COPY scripts ./scripts

FROM build-common AS build-cpu
# Empty: synth only, no torch (the image stays small). "transformers": CPU torch + extra.
ARG CPU_EXTRAS=""
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$CPU_EXTRAS" ]; then \
      pip install --index-url https://download.pytorch.org/whl/cpu torch; \
      pip install ".[${CPU_EXTRAS}]"; \
    else \
      pip install .; \
    fi
# The installed console script starts. (Not `python -c` here: run in /src, it
# would import the sources beside it instead of what was installed. The API
# version comes from the package's metadata, which pyproject keeps equal to
# version.json.)
RUN audiocraft-service --help >/dev/null

FROM build-common AS build-gpu
# torch first, from the CUDA index, so that no later install can replace it with
# a CPU or differently built wheel (the later steps pin it as a constraint). A
# current torch is fine for AudioGen: the audiocraft backend applies the
# torch.load weights_only fix itself (core_base/backends/audiocraft_compat.py).
ARG TORCH_VERSION=2.8.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
 && pip freeze | grep -i '^torch==' > /tmp/torch-constraint.txt \
 && pip install -c /tmp/torch-constraint.txt ".[transformers]" \
 && bash scripts/install_audiocraft.sh
RUN audiocraft-service --help >/dev/null

# --- runtime stages -------------------------------------------------------------
FROM base AS runtime
WORKDIR /app
# The model cache: the compose file mounts a named volume here (CACHE_MODEL_DIR).
# Created and owned by the app user in the image, so that a fresh named volume
# inherits that ownership and the non-root process can write to it.
ENV CACHE_MODEL_DIR=/models \
    HF_HOME=/models/huggingface \
    TORCH_HOME=/models/torch
RUN mkdir -p /models/huggingface /models/torch /models/audiocraft \
 && chown -R app:app /models /app
LABEL org.opencontainers.image.title="audiocraft-service" \
      org.opencontainers.image.description="Text-to-audio service (AudioGen, MusicGen)" \
      org.opencontainers.image.licenses="MIT (code); model weights CC-BY-NC-4.0"

FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER app
ENTRYPOINT ["audiocraft-service"]
CMD ["--help"]

# Last, so that a plain `docker build .` gives the small image.
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
USER app
ENTRYPOINT ["audiocraft-service"]
CMD ["--help"]
