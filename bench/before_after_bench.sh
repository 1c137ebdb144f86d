#!/usr/bin/env bash
# `shufflefs bench` on a file:// mount of two trees, interleaved: OLD (a worktree of an earlier
# commit) and this checkout; every request reaches the daemon (--no-passthrough). Run it on an
# otherwise idle machine:
#   git worktree add /var/tmp/wt-old <commit> && bash bench/before_after_bench.sh /var/tmp/wt-old
set -euo pipefail
old=${1:?usage: bench/before_after_bench.sh OLD_TREE [ROUNDS]}
rounds=${2:-3}
new=$(cd "$(dirname "$0")/.." && pwd)
python=$new/.venv/bin/python
base=$(mktemp -d /var/tmp/shufflefs-before-after-XXXX)
trap 'rm -rf "$base"' EXIT
for round in $(seq "$rounds"); do
  for tree in "$old" "$new"; do
    mkdir -p "$base/store" "$base/mnt"
    PYTHONPATH=$tree "$python" -m shufflefs mount "file://$base/store" "$base/mnt" --cache-dir "$base/cache" \
      --no-passthrough >/dev/null
    PYTHONPATH=$tree "$python" -m shufflefs bench "$base/mnt" --mappers 100 --reducers 100 --block-size 4K --json \
      | "$python" -c 'import json, sys
phases = json.load(sys.stdin)["targets"]["dir"]["phases"]
print(sys.argv[1], sys.argv[2], {k: round(v["seconds"], 3) for k, v in phases.items()})' "$round" "$tree"
    PYTHONPATH=$tree "$python" -m shufflefs umount "$base/mnt" >/dev/null
    rm -rf "$base/store" "$base/cache"
  done
done
