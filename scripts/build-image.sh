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
  buildah bud --layers --isolation chroot --network host "${ARGS[@]}"
else
  echo "neither a docker daemon nor buildah: install one (Debian: apt-get install buildah)" >&2
  exit 1
fi
