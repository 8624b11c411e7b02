#!/usr/bin/env bash
# Build a local base image (Debian bookworm + Python 3.11 + venv + pip) without any container registry:
# debootstrap a minimal root from the Debian mirror in this machine's apt sources, then `podman import` it.
# Used by `make images BASE=local` where the public python image cannot be pulled (no registry access).
#   containers/local_base.sh [IMAGE]        # default IMAGE: localhost/mmcurate-base:bookworm
# Needs root, debootstrap and podman (apt-get install -y podman debootstrap).
set -euo pipefail
IMAGE=${1:-localhost/mmcurate-base:bookworm}
# The first Debian mirror named in the apt sources (deb822 "URIs:" or one-line "deb URL suite ..."), not the
# security one; MIRROR=... overrides it.
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
    | sed -nE 's/^URIs:[[:space:]]*([^[:space:]]+).*/\1/p; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
    | grep -v -- '-security' | head -n 1 || true)
fi
: "${MIRROR:?no Debian mirror found in /etc/apt/sources.list*; set MIRROR=http://...}"
ROOTFS=$(mktemp -d "${TMPDIR:-/var/tmp}/mmcurate-base.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm from $MIRROR into $ROOTFS"
t0=$(date +%s)
# python3 (3.11 on bookworm) + venv/ensurepip + pip; python-is-python3 gives `python` as in the python image.
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
  bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || { tail -n 30 "$ROOTFS.log" >&2; exit 1; }
rm -f "$ROOTFS.log"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
# The build host's CA bundle (Debian's roots plus any TLS-inspecting proxy's CA, as on these machines), so that
# pip inside `podman build` trusts what the host trusts; pip < 24.2 (ensurepip's) reads only certifi: PIP_CERT.
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
tar -C "$ROOTFS" --numeric-owner -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$IMAGE" >/dev/null
echo "imported $IMAGE in $(( $(date +%s) - t0 )) s: $(chroot "$ROOTFS" python3 --version 2>&1 || echo '?')"
