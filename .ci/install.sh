#!/usr/bin/env bash
# Installs everything shufflefs and its tests need on Debian (run as root): FUSE 3, Java 17 for
# PySpark, a virtualenv in .venv with shufflefs (editable) and the test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

source mount-helpers/debian-packages.sh
packages=(ca-certificates python3 python3-dev python3-venv gcc fuse3 libfuse3-dev pkg-config procps xxd)
# a JDK 17 installed some other way is fine too
if ! { command -v java >/dev/null 2>&1 && java -version 2>&1 | grep -q 'version "17'; }; then
  packages+=(openjdk-17-jre-headless)
fi
install_missing "${packages[@]}"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# pip's and the build backend's chatter (warnings of setuptools about editable installs) goes
# to a log, shown only when the install fails
pip_log=.venv/pip-install.log
{ .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip \
    && .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'; } > "$pip_log" 2>&1 \
  || { cat "$pip_log" >&2; echo "install.sh: pip failed (log above, also in $pip_log)" >&2; exit 1; }
.venv/bin/python -c 'import pyfuse3, trio, boto3, lmdb, pyspark, shufflefs' \
  || { echo "install.sh: the Python packages did not install" >&2; exit 1; }
