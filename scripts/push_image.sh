#!/usr/bin/env bash
# Logs in to the registry and pushes the images built by build_dockerfile.sh:
#
#   <ECR>:audio_craft_<version> and <ECR>:audio_craft_<version>_cpu
#
# Usage:
#   scripts/push_image.sh [REGISTRY]      (or ECR=... in the environment)
#
# An Amazon ECR registry (<account>.dkr.ecr.<region>.amazonaws.com/...) is
# logged in with `aws ecr get-login-password` (AWS credentials from the usual
# AWS CLI sources); any other registry must already be logged in (`docker login`).
# Environment: ECR, TARGETS (default "gpu cpu").
set -euo pipefail

die() {
  printf 'push_image: %s\n' "$*" >&2
  exit 1
}

script_dir="${BASH_SOURCE[0]%/*}"
[[ "$script_dir" == "${BASH_SOURCE[0]}" ]] && script_dir=.
root="$(cd "$script_dir/.." && pwd)"

registry="${1:-${ECR:-}}"
[[ -n "$registry" ]] || die "no registry: pass it as the first argument or set ECR (e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/audiocraft)"
[[ "$registry" == */* ]] || die "'$registry' names no registry: use <registry host>/<repository>"

# shellcheck source=scripts/lib/image.sh
. "$root/scripts/lib/image.sh"
tag="$(image_tag)" || exit 1

command -v docker >/dev/null 2>&1 || die "docker is not installed or not on PATH"

host="${registry%%/*}"
ecr_pattern='^[0-9]{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com$'
if [[ "$host" =~ $ecr_pattern ]]; then
  region="${BASH_REMATCH[1]}"
  command -v aws >/dev/null 2>&1 || die "the AWS CLI is required to log in to ECR ($host)"
  aws ecr get-login-password --region "$region" \
    | docker login --username AWS --password-stdin "$host"
else
  echo "push_image: $host is not Amazon ECR; using the existing 'docker login' for it"
fi

for target in ${TARGETS:-gpu cpu}; do
  image="$(image_name "$registry" "$tag" "$target")" || exit 1
  docker push "$image"
  echo "image ${image} is pushed"
done
