#!/usr/bin/env bash
# Builds the SageMaker image with docker where a daemon answers, else with
# buildah (Debian package; no daemon, runs as root with chroot isolation).
#
#   scripts/build-image.sh                                   # master-poc-preprocess:1.0.0 from python:3.11-slim-bookworm
#   scripts/build-image.sh --tag REPO:1.0.0 --base IMAGE     # another tag or base image
#
# Layer caching is on: a code change rebuilds only the package layer, not
# the dependencies (see the Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=master-poc-preprocess:1.0.0
BASE=python:3.11-slim-bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    *) echo "usage: $0 [--tag TAG] [--base IMAGE]" >&2; exit 2 ;;
  esac
done
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then COMMIT="$COMMIT-dirty"; fi
ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg "GIT_COMMIT=$COMMIT" -t "$TAG" .)
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "building $TAG with docker from $BASE (commit $COMMIT)" >&2
  docker build "${ARGS[@]}"
elif command -v buildah >/dev/null 2>&1; then
  echo "building $TAG with buildah from $BASE (commit $COMMIT)" >&2
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  for attempt in 1 2; do
    if buildah bud --layers --isolation chroot --network host "${ARGS[@]}" 2>&1 | tee "$log"; then
      exit 0
    fi
    # Seen once here: the runtime failed to seal its memfd copy (EBUSY) in a
    # RUN step; a second attempt, with the finished layers cached, went through.
    if [ "$attempt" -eq 1 ] && grep -q "sealing memfd copy" "$log"; then
      echo "buildah: transient runtime error (sealing memfd copy), building again" >&2
      continue
    fi
    exit 1
  done
else
  echo "neither a docker daemon nor buildah: install one (Debian: apt-get install buildah)" >&2
  exit 1
fi
