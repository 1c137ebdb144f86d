"""One run of bench/spark_bench.py: a workload on a system, its times, memory, files and
store requests, or why it failed."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import traceback

from spark_bench_systems import WORKLOAD_SCRIPT, RssSampler, SeaweedS3, System, bucket_usage, file_sizes, tail

from shufflefs.testing.sparkrun import run_spark, shuffle_files, stderr_path_of

# ============================================================================ one run


def failure_reason(error: BaseException) -> str:
    """One line: the first line of the error plus the line that names the cause, if any."""
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    reason = re.sub(r",? local_dir=\S+\)", ")", lines[0])  # run_spark_job's long path
    reason = re.sub(r"did not reach SPARK_JOBS_DONE within (\S+)s", r"timed out after \1 s", reason)
    for line in lines[1:]:  # e.g. "...SparkException: Job aborted due to stage failure: ... IOException: ..."
        if re.search(r"Exception:|Error:|error:", line) and "An error occurred while calling" not in line:
            reason += " | " + line.strip()
            break
    return reason[:500]


def spark_app_work_dir(stderr_path: str) -> str | None:
    """$SPARK_HOME/work/<app>: local-cluster executor logs, kept by Spark after a failure."""
    m = re.search(r"\bapp=(app-[\w-]+)", tail(stderr_path, 1 << 20))
    if not m:
        return None
    from pyspark.find_spark_home import _find_spark_home

    return os.path.join(os.environ.get("SPARK_HOME") or _find_spark_home(), "work", m.group(1))


def run_once(workload: str, system: System, round_number: int, args, base: str, timeout: float) -> dict:
    record = {"workload": workload, "config": system.name, "round": round_number, "status": "ok"}
    if not os.path.isdir(base):
        print(f"(work dir {base} vanished, recreated) ", end="", flush=True)
        os.makedirs(base)
    run_dir = tempfile.mkdtemp(dir=base, prefix=f"{workload}-{system.name}-r{round_number}-")
    result_path = os.path.join(run_dir, "result.json")
    driver_stderr = stderr_path_of(result_path)
    seaweed = None
    sampler = RssSampler(None)
    try:
        if system.needs_s3:
            seaweed = SeaweedS3().start()
        local_dir = system.start(run_dir, seaweed)
        sampler = RssSampler(system.pid())
        at_pause: dict = {}

        def while_spark_runs() -> None:  # all jobs done, shuffle files still in place
            files = shuffle_files(local_dir)
            at_pause["shuffle_files"] = len(files)
            at_pause["shuffle_file_bytes"] = file_sizes(files)
            if seaweed is not None:
                at_pause["bucket"] = bucket_usage(seaweed, "spark-bench")

        run = run_spark(
            local_dir,
            result_path,
            pause_callback=while_spark_runs,
            timeout=timeout,
            script=WORKLOAD_SCRIPT,
            master=args.master,
            extra_args=["--workload", workload, "--scale", str(args.scale)],
        )
        output = run.result
        record.update(
            job_s=output["timings"]["jobs_s"],
            wall_s=round(run.wall_s, 3),
            steps=output["timings"],
            spark=output["metrics"],
            **at_pause,
        )
        record["result"] = output["result"]
        record.update(system.stop())
    except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
        record["status"] = f"failed: {failure_reason(e)}"
        record["error"] = f"{e}\n{traceback.format_exc()}"
        peer_log = getattr(system, "log_path", "")
        if peer_log:
            record["error"] += f"\n--- {system.name} log tail ---\n{tail(peer_log)}"
        if os.path.exists(driver_stderr):
            record["error"] += f"\n--- Spark driver stderr tail ---\n{tail(driver_stderr, 20000)}"
    finally:
        # A failed or interrupted job leaves its executors' logs in $SPARK_HOME/work/<app>
        # (they are in the error above); a successful one has removed them already.
        if os.path.exists(driver_stderr):
            work = spark_app_work_dir(driver_stderr)
            if work:
                shutil.rmtree(work, ignore_errors=True)
        try:
            system.cleanup()
        finally:
            record["peak_rss_mib"] = sampler.stop()
            if seaweed is not None:
                seaweed.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
            os.sync()  # the next run does not pay for this one's dirty pages
    return record
