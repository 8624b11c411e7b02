#!/usr/bin/env bash
# Build the container images with podman (what `make images` runs), each with its in-build smoke stage.
#   containers/build_images.sh [ROLE ...]          # default: cpu gpu train vllm
# Variables (the Makefile passes them): REGISTRY, IMAGE_TAG (tags REGISTRY/mmcurate-ROLE:IMAGE_TAG),
#   IMAGE_BASE  the base image: a public one (default python:3.11.7-slim-bookworm); `auto` (the default here)
#               uses it when it can be pulled and otherwise builds and uses a local one (containers/local_base.sh,
#               debootstrap from the apt mirror, for machines without registry access); `local` forces the local one.
#   LOCAL_BASE  the local base's name (localhost/mmcurate-base:bookworm); IMAGE_LOG_DIR: full build logs (.state/image-logs).
# `--isolation chroot` runs the RUN steps without a container runtime (no cgroups needed), as on these machines;
# `podman run` is not needed: the smoke steps are RUN steps of the build.
set -euo pipefail
trap 'echo "build_images.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROLES=("${@:-cpu gpu train vllm}")
read -r -a ROLES <<<"${ROLES[*]}"
REGISTRY=${REGISTRY:-localhost}
IMAGE_TAG=${IMAGE_TAG:-dev}
PUBLIC_BASE=python:3.11.7-slim-bookworm
IMAGE_BASE=${IMAGE_BASE:-auto}
LOCAL_BASE=${LOCAL_BASE:-localhost/mmcurate-base:bookworm}
LOG_DIR=${IMAGE_LOG_DIR:-.state/image-logs}
mkdir -p "$LOG_DIR"
command -v podman >/dev/null || { echo "make images: needs podman (apt-get install -y podman debootstrap)" >&2; exit 1; }

if [ "$IMAGE_BASE" = auto ]; then
  if podman image exists "$PUBLIC_BASE" || podman pull --quiet "$PUBLIC_BASE" >/dev/null 2>&1; then
    IMAGE_BASE=$PUBLIC_BASE
  else
    echo "images: $PUBLIC_BASE cannot be pulled (no registry access): using the local base $LOCAL_BASE"
    IMAGE_BASE=local
  fi
fi
if [ "$IMAGE_BASE" = local ]; then
  podman image exists "$LOCAL_BASE" || bash containers/local_base.sh "$LOCAL_BASE"
  IMAGE_BASE=$LOCAL_BASE
fi

for role in "${ROLES[@]}"; do
  tag="$REGISTRY/mmcurate-$role:$IMAGE_TAG"
  log="$LOG_DIR/$role.log"
  echo "== $role: podman build -f containers/$role.Dockerfile --build-arg BASE=$IMAGE_BASE -t $tag (log: $log)"
  t0=$(date +%s)
  if ! podman build --isolation chroot --layers --build-arg "BASE=$IMAGE_BASE" \
      -f "containers/$role.Dockerfile" -t "$tag" . >"$log" 2>&1; then
    echo "== $role: FAILED after $(( $(date +%s) - t0 )) s; last lines of $log:" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
  secs=$(( $(date +%s) - t0 ))
  size=$(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}') || size="size unknown"
  echo "== $role: built $tag in $secs s, $size"
  if grep -q -E '^smoke: ' "$log"; then
    grep -E '^smoke: ' "$log" | sed 's/^/   /' | cut -c1-220
  else  # smoke stage cached: its report (from the build that ran it) is in the image
    mnt=$(podman image mount "$tag")
    python3 - "$mnt/build/smoke-$role.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("   smoke (cached layer, report in the image):", r["role"], "ok" if r["ok"] else "FAILED", r["seconds"], "s",
      json.dumps(r["result"])[:160])
PY
    podman image unmount "$tag" >/dev/null
  fi
done
