"""How many pydaos calls (each one or more network round trips on a real DAOS system) each
store operation of the daos:// store costs, counted with the stand-in in tests/fake_pydaos.

    PYTHONPATH=tests/fake_pydaos .venv/bin/python bench/daos_calls.py [--out bench/results/daos-calls.json]

Against the stand-in only wall time means nothing (SQLite, not DAOS), so this counts calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from shufflefs.stores import open_store

try:
    from pydaos import _fake
except ImportError:
    sys.exit("daos_calls.py counts the calls of the pydaos stand-in: run it with PYTHONPATH=tests/fake_pydaos")

CALLS = ("kv_put_calls", "kv_get_calls", "kv_iter_calls")
KiB, MiB = 1024, 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        os.environ["FAKE_PYDAOS_DIR"] = os.path.join(work, "daos")
        _fake.create_system(os.environ["FAKE_PYDAOS_DIR"])
        _fake.create_pool("tank")
        _fake.create_container("tank", "shuffle")
        store = open_store("daos://tank/shuffle")
        store.check()

        def local(size: int) -> str:
            path = os.path.join(work, f"f{size}")
            with open(path, "wb") as f:
                f.write(os.urandom(size))
            return path

        index, data = local(8 * KiB), local(10 * MiB)
        d = "blockmgr-1/0c"
        store.put_file(f"{d}/warmup", index)  # opens the dictionaries once, like a running mount
        store.delete_many([f"{d}/warmup"])
        steps = [
            ("put 8 KiB index (2 directory levels)", lambda: store.put_file(f"{d}/shuffle_0_1_0.index", index)),
            ("put 10 MiB data", lambda: store.put_file(f"{d}/shuffle_0_1_0.data", data)),
            ("put 10 MiB replacing it", lambda: store.put_file(f"{d}/shuffle_0_1_0.data", data)),
            ("head", lambda: store.head(f"{d}/shuffle_0_1_0.data")),
            ("read 16 bytes of the index", lambda: store.get_range(f"{d}/shuffle_0_1_0.index", 8, 16)),
            ("read 10 MiB", lambda: store.get_range(f"{d}/shuffle_0_1_0.data", 0, 10 * MiB)),
            ("list the directory", lambda: store.list_dir(d)),
            (
                "move (rename a committed file)",
                lambda: store.move(f"{d}/shuffle_0_1_0.index", f"{d}/shuffle_0_2_0.index"),
            ),
            (
                "delete both files (empties 2 directories)",
                lambda: store.delete_many([f"{d}/shuffle_0_2_0.index", f"{d}/shuffle_0_1_0.data"]),
            ),
        ]
        rows = []
        for what, step in steps:
            before = _fake.counters()
            step()
            after = _fake.counters()
            calls = {name: after.get(name, 0) - before.get(name, 0) for name in CALLS}
            rows.append({"operation": what, **calls, "total": sum(calls.values())})
        store.close()
    print(f"{'operation':45} {'bput':>5} {'bget':>5} {'iter':>5} {'total':>6}")
    for row in rows:
        print(
            f"{row['operation']:45} {row['kv_put_calls']:5} {row['kv_get_calls']:5} {row['kv_iter_calls']:5} "
            f"{row['total']:6}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
