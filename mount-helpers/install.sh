#!/usr/bin/env bash
# Installs shufflefs on a Debian node (as root), for use rather than for its tests: the runtime
# Debian packages, a virtualenv with shufflefs and its runtime dependencies only, `shufflefs` on
# the PATH, and the mount(8) helpers (mount -t fuse.shufflefs, /etc/fstab, umount). Idempotent:
# run it again after `git pull` to upgrade. The test tools live in .venv (.ci/install.sh).
#
#   bash mount-helpers/install.sh [--prefix /opt/shufflefs] [--bin-dir /usr/local/bin] [--helper-dir /sbin]
set -euo pipefail
prefix=/opt/shufflefs bin_dir=/usr/local/bin helper_dir=/sbin
usage="usage: bash mount-helpers/install.sh [--prefix DIR] [--bin-dir DIR] [--helper-dir DIR]"
while (($#)); do
  case "$1" in
    --prefix|--bin-dir|--helper-dir)
      (($# >= 2)) || { echo "install.sh: $1 needs a directory; $usage" >&2; exit 2; }
      case "$1" in --prefix) prefix=$2 ;; --bin-dir) bin_dir=$2 ;; --helper-dir) helper_dir=$2 ;; esac
      shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "install.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
source_dir=$(cd "$(dirname "$0")/.." && pwd)

# building pyfuse3 needs the compiler and libfuse3's headers; running needs fuse3 (fusermount3)
source "$source_dir/mount-helpers/debian-packages.sh"
install_missing ca-certificates python3 python3-dev python3-venv gcc pkg-config fuse3 libfuse3-dev

[ -x "$prefix/bin/python" ] || python3 -m venv "$prefix"
"$prefix/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
# a copy, not an editable install: the node keeps working if the checkout moves or changes
"$prefix/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$source_dir"
mkdir -p "$bin_dir" "$helper_dir"
ln -sfn "$prefix/bin/shufflefs" "$bin_dir/shufflefs"
"$prefix/bin/shufflefs" install-mount-helper --dir "$helper_dir" >/dev/null
echo "installed $("$bin_dir/shufflefs" --version) in $prefix: $bin_dir/shufflefs, mount helpers in $helper_dir"
case ":$PATH:" in
  *":$bin_dir:"*) ;;
  *) echo "note: $bin_dir is not on this shell's PATH" ;;
esac
