"""The quick-start job: mount shufflefs on a file:// store, run a PySpark job with several
shuffles on it, show its shuffle files with ls and xxd and what reached the store while Spark
still runs, then unmount (which drains)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
from shufflefs.testing.sparkrun import run_spark_job, shuffle_files  # noqa: E402

BASE = os.environ.get("SHUFFLEFS_DEMO_DIR", "/var/tmp/shufflefs-demo")
STORE, MOUNT, CACHE = (os.path.join(BASE, d) for d in ("store", "mnt", "cache"))
SHUFFLEFS = [sys.executable, "-m", "shufflefs"]


BOLD, PLAIN = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
PROGRESS_EVERY = 10.0  # seconds between lines while Spark runs


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{PLAIN}", flush=True)


def report_progress(started: float, done: threading.Event, log_path: str) -> None:
    """A line every PROGRESS_EVERY seconds while Spark runs, so that the demo is not silent."""
    while not done.wait(PROGRESS_EVERY):
        print(
            f"   ... Spark running for {time.monotonic() - started:.0f} s, "
            f"{len(shuffle_files(MOUNT))} shuffle files committed so far (its log: {log_path})",
            flush=True,
        )


def shell(command: str) -> None:
    print(f"$ {command}", flush=True)
    subprocess.run(command, shell=True, check=False)


def show_while_spark_runs() -> None:
    files = shuffle_files(MOUNT)
    say(f"Spark finished its jobs and still holds {len(files)} committed shuffle files")
    shell(f"ls {MOUNT}/spark-*/executor-*/")
    index = max((f for f in files if f.endswith(".index")), key=os.path.getsize)
    shell(f"ls -l {os.path.dirname(index)} | head -n 12")
    say("an index file: (R+1) big-endian offsets")
    shell(f"cat {index} | xxd | head -n 4")
    say("what reached the store: every committed shuffle file, at its path, and nothing else")
    shell(f"find {STORE} -type f | head -n 5")
    stored = {os.path.relpath(os.path.join(d, n), STORE) for d, _, ns in os.walk(STORE) for n in ns}
    mounted = {os.path.relpath(f, MOUNT) for f in files}
    print(
        f"{len(mounted)} shuffle files on the mount, {len(stored)} objects in the store, "
        f"identical paths: {stored == mounted}"
    )
    shell(f"cmp {index} {os.path.join(STORE, os.path.relpath(index, MOUNT))} && echo 'index bytes identical'")


def main() -> int:
    if os.path.ismount(MOUNT):
        subprocess.run([*SHUFFLEFS, "umount", MOUNT])
    shutil.rmtree(BASE, ignore_errors=True)
    for d in (STORE, MOUNT):
        os.makedirs(d)
    say(f"mount file://{STORE} on {MOUNT}")
    shell(f"shufflefs mount file://{STORE} {MOUNT} --cache-dir {CACHE} --cache-size 4G")
    try:
        say(f"run a PySpark job (RDD and DataFrame shuffles, 8 and 256 partitions) with spark.local.dir={MOUNT}")
        result_path = os.path.join(BASE, "result.json")
        spark_done = threading.Event()

        def show_once_spark_ran() -> None:
            spark_done.set()
            show_while_spark_runs()

        threading.Thread(
            target=report_progress, args=(time.monotonic(), spark_done, result_path + ".stderr"), daemon=True
        ).start()
        try:
            result = run_spark_job(MOUNT, result_path, pause_callback=show_once_spark_ran)
        finally:
            spark_done.set()
        say("job results")
        for name, summary in sorted(result.items()):
            print(f"  {name:22} rows={summary.get('count')}")
    finally:
        say("unmount: pending uploads are drained first")
        shell(f"shufflefs umount {MOUNT}")
    say("after Spark cleaned up its shuffle files, the store is empty again")
    shell(f"find {STORE} -type f | wc -l")
    return 0


if __name__ == "__main__":
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    sys.exit(main())
