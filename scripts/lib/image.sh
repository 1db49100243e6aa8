# Shared by build_dockerfile.sh and push_image.sh (sourced, not run): the image
# tag from version.json and the image name of each target. The caller defines
# die() and sets $root (the repository).

# The tag: api_version in version.json, read with jq.
image_tag() {
  command -v jq >/dev/null 2>&1 || die "jq is required to read the version from version.json; install it (apt-get install -y jq / brew install jq)"
  local version_file="$root/version.json"
  [[ -f "$version_file" ]] || die "$version_file not found: it holds the image tag (api_version)"
  jq -er '.api_version | select(type == "string" and length > 0)' "$version_file" 2>/dev/null \
    || die "$version_file has no api_version string"
}

# The image of a target: image_name REGISTRY TAG TARGET
image_name() {
  case "$3" in
    gpu) echo "${1}:audio_craft_${2}" ;;
    cpu) echo "${1}:audio_craft_${2}_cpu" ;;
    *) die "unknown target '$3' (gpu or cpu)" ;;
  esac
}
