#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm, made from Debian's own packages,
# for machines that reach Debian's mirror but no image registry. Needs root
# and debootstrap + podman (Debian packages). Prints the image name.
#
#   scripts/standin-base.sh [NAME]     # default localhost/master-poc-base:bookworm
#   scripts/build-image.sh --base localhost/master-poc-base:bookworm
set -euo pipefail
NAME=${1:-localhost/master-poc-base:bookworm}
if podman image exists "$NAME" 2>/dev/null; then echo "$NAME"; exit 0; fi
# This machine's Debian mirror (the first non-security one apt uses).
MIRROR=$( (cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true) \
  | awk '/security/ {next} /^URIs:/ {print $2; exit} /^deb / {print ($2 ~ /^\[/) ? $3 : $2; exit}')
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT=$(mktemp -d /tmp/master-poc-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
echo "debootstrap bookworm from $MIRROR (about 1.5 minutes)" >&2
debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
  bookworm "$ROOT" "$MIRROR" >/dev/null
# As in the official python image: pip may install system-wide; python and pip on PATH.
rm -f "$ROOT/usr/lib/python3.11/EXTERNALLY-MANAGED"
ln -sf /usr/bin/python3.11 "$ROOT/usr/local/bin/python"
ln -sf /usr/bin/python3.11 "$ROOT/usr/local/bin/python3"
ln -sf /usr/bin/pip3 "$ROOT/usr/local/bin/pip"
# The package index is reached through this machine's certificates.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | podman import - "$NAME" >/dev/null
echo "$NAME"
