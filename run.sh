#!/usr/bin/env bash
# README command 1: set up, then run the job. With no arguments it generates
# 20 VitalDB-format sample cases and processes them into ./output.
# Any arguments go to master-poc-preprocess (see --help).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-env.sh
exec .venv/bin/master-poc-preprocess "$@"
