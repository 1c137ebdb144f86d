#!/usr/bin/env bash
# Installs what is needed, then runs every test layer: stores (memory, file, SeaweedFS), the
# filesystem core, real mounts, the command line and real PySpark jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
set +e
.venv/bin/python -m pytest -p no:cacheprovider -rs "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
