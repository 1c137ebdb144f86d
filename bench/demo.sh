#!/usr/bin/env bash
# Quick start: install everything, then mount shufflefs on a file:// store, run a PySpark job
# with several shuffles on it, show its shuffle files and the store, and unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh
exec .venv/bin/python bench/demo.py
