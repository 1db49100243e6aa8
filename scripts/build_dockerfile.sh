#!/usr/bin/env bash
# Builds the service images with the names of the deployment guide:
#
#   <ECR>:audio_craft_<version>       target gpu: the GPU workers
#   <ECR>:audio_craft_<version>_cpu   target cpu: App API, sub-service APIs,
#                                     migrate, and the workers on CPU
#
# <version> is api_version in version.json (read with jq).
#
# Usage:
#   scripts/build_dockerfile.sh [REGISTRY] [-- EXTRA DOCKER BUILD ARGS...]
#   ECR=123456789012.dkr.ecr.eu-west-1.amazonaws.com/audiocraft scripts/build_dockerfile.sh
#
# Environment: ECR (when no REGISTRY argument), TARGETS (default "gpu cpu"),
# PLATFORM (default linux/amd64: the GPU hosts' architecture).
# Example: scripts/build_dockerfile.sh audiocraft -- --build-arg CPU_EXTRAS=transformers
set -euo pipefail

die() {
  printf 'build_dockerfile: %s\n' "$*" >&2
  exit 1
}

script_dir="${BASH_SOURCE[0]%/*}"
[[ "$script_dir" == "${BASH_SOURCE[0]}" ]] && script_dir=.
root="$(cd "$script_dir/.." && pwd)"

registry="${ECR:-}"
if [[ $# -gt 0 && "$1" != "--" ]]; then
  registry="$1"
  shift
fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
extra_args=("$@")

[[ -n "$registry" ]] || die "no registry: pass it as the first argument or set ECR (e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/audiocraft)"
[[ "$registry" != *[[:space:]]* && "$registry" != */ ]] || die "bad registry '$registry'"

# shellcheck source=scripts/lib/image.sh
. "$root/scripts/lib/image.sh"
tag="$(image_tag)" || exit 1

command -v docker >/dev/null 2>&1 || die "docker is not installed or not on PATH"

for target in ${TARGETS:-gpu cpu}; do
  image="$(image_name "$registry" "$tag" "$target")" || exit 1
  DOCKER_BUILDKIT=1 docker build \
    --file "$root/dockerfile" \
    --target "$target" \
    --platform "${PLATFORM:-linux/amd64}" \
    --label "org.opencontainers.image.version=${tag}" \
    --tag "$image" \
    ${extra_args[@]+"${extra_args[@]}"} \
    "$root"
  echo "image ${image} is built"
done
