"""The summary of bench/spark_bench.py's runs: medians per workload and system, ratios to the
plain directory, the table and the plot."""

from __future__ import annotations

import re
import statistics

# ============================================================================ reporting


def ok_runs(runs: list[dict], workload: str, config: str) -> list[dict]:
    return [r for r in runs if r["workload"] == workload and r["config"] == config and r["status"] == "ok"]


def median_of(runs: list[dict], key) -> float | None:
    values = [v for v in (key(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], workloads: list[str], configs: list[str], skipped: dict) -> list[dict]:
    rows = []
    for workload in workloads:
        plain_runs = ok_runs(runs, workload, "plain")
        plain = median_of(plain_runs, lambda r: r["job_s"])
        for config in configs:
            mine = [r for r in runs if r["workload"] == workload and r["config"] == config]
            good = [r for r in mine if r["status"] == "ok"]
            job = median_of(good, lambda r: r["job_s"])
            rss = [r["peak_rss_mib"] for r in good if r.get("peak_rss_mib") is not None]
            rows.append(
                {
                    "workload": workload,
                    "config": config,
                    "runs": len(mine),
                    "ok": len(good),
                    "job_s_median": job,
                    "ratio_to_plain": job / plain if job is not None and plain else None,
                    "wall_s_median": median_of(good, lambda r: r.get("wall_s")),
                    "umount_s_median": median_of(good, lambda r: r.get("umount_s")),
                    "peak_rss_mib_max": max(rss) if rss else None,
                    "shuffle_write_bytes_median": median_of(
                        good, lambda r: r.get("spark", {}).get("shuffle_write_bytes")
                    ),
                    "shuffle_file_bytes_median": median_of(good, lambda r: r.get("shuffle_file_bytes")),
                    "store_put_requests_median": median_of(good, lambda r: r.get("store", {}).get("put_requests")),
                    "store_put_bytes_median": median_of(good, lambda r: r.get("store", {}).get("put_bytes")),
                    "store_delete_requests_median": median_of(
                        good, lambda r: r.get("store", {}).get("delete_requests")
                    ),
                    "store_deleted_keys_median": median_of(good, lambda r: r.get("store", {}).get("deleted_keys")),
                    "store_failed_requests_max": max(
                        (r.get("store", {}).get("failed_requests", 0) for r in good), default=None
                    ),
                    "bucket_objects_at_end_median": median_of(good, lambda r: r.get("bucket", {}).get("objects")),
                    "bucket_bytes_at_end_median": median_of(good, lambda r: r.get("bucket", {}).get("bytes")),
                    "failures": [r["status"] for r in mine if r["status"] != "ok"],
                    "skipped": skipped.get(config),
                }
            )
    return rows


def fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-".rjust(int(re.match(r"\d*", spec).group() or 0))
    return format(value / scale, spec)


def print_summary(rows: list[dict]) -> None:
    header = (
        f"{'workload':14} {'config':22} {'runs':>5} {'job s':>7} {'ratio':>6} {'wall s':>7} "
        f"{'umount s':>8} {'RSS MiB':>8} {'shuffle GB':>10} {'files GB':>8}  store / bucket"
    )
    print("\n" + header)
    print("-" * len(header))
    for row in rows:
        if row["skipped"] or row["runs"] == 0:
            print(
                f"{row['workload']:14} {row['config']:22} "
                + (f"skipped: {row['skipped']}" if row["skipped"] else "not run")
            )
            continue
        store = ""
        if row["store_put_requests_median"] is not None:
            store = (
                f"{row['store_put_requests_median']:.0f} PUT {fmt(row['store_put_bytes_median'], '.2f', 1e9)} GB, "
                f"{fmt(row['store_delete_requests_median'], '.0f')} DELETE req "
                f"({fmt(row['store_deleted_keys_median'], '.0f')} keys)"
            )
            if row["store_failed_requests_max"]:
                store += f", {row['store_failed_requests_max']} failed"
        if row["bucket_objects_at_end_median"] is not None:
            store += ("; " if store else "") + (
                f"bucket at end of jobs: {row['bucket_objects_at_end_median']:.0f} obj "
                f"{fmt(row['bucket_bytes_at_end_median'], '.2f', 1e9)} GB"
            )
        print(
            f"{row['workload']:14} {row['config']:22} {row['ok']:>2}/{row['runs']:<2} "
            f"{fmt(row['job_s_median'], '7.1f')} {fmt(row['ratio_to_plain'], '6.2f')} "
            f"{fmt(row['wall_s_median'], '7.1f')} {fmt(row['umount_s_median'], '8.1f')} "
            f"{fmt(row['peak_rss_mib_max'], '8.0f')} {fmt(row['shuffle_write_bytes_median'], '10.2f', 1e9)} "
            f"{fmt(row['shuffle_file_bytes_median'], '8.2f', 1e9)}  {store}"
        )
        for failure in sorted(set(row["failures"])):
            print(f"{'':38} {row['failures'].count(failure)}x {failure}")
    print(
        "job s: median job time (first Spark action to last); ratio: to plain's median; wall s: driver start "
        "to exit of all Spark processes;\nRSS: peak of the filesystem process; shuffle GB: Spark's shuffle write "
        "bytes; files GB: committed shuffle files at the end of the jobs"
    )


def plot(runs: list[dict], rows: list[dict], workloads: list[str], configs: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(workloads), figsize=(max(7.0, 5.5 * len(workloads)), 5.0), squeeze=False)
    by_key = {(r["workload"], r["config"]): r for r in rows}
    for ax, workload in zip(axes[0], workloads):
        medians = [by_key[(workload, c)]["job_s_median"] for c in configs]
        top = max([m for m in medians if m is not None] + [1.0])
        bars = ax.bar(range(len(configs)), [m or 0 for m in medians], color="#9ecae1", edgecolor="#3182bd", zorder=2)
        for i, config in enumerate(configs):
            times = [r["job_s"] for r in ok_runs(runs, workload, config)]
            if times:
                jitter = [(j - (len(times) - 1) / 2) * 0.08 for j in range(len(times))]
                ax.scatter([i + dx for dx in jitter], times, color="#08519c", s=14, zorder=3)
            row = by_key[(workload, config)]
            if row["skipped"]:
                label = "skipped"
            elif row["runs"] == 0:
                label = "not run"
            elif row["job_s_median"] is None:
                label = "failed"
            else:
                label = f"{row['job_s_median']:.1f} s"
                if row["ratio_to_plain"] is not None and config != "plain":
                    label += f"\n×{row['ratio_to_plain']:.2f}"
                if row["failures"]:
                    label += f"\n{len(row['failures'])} failed"
            ax.annotate(
                label,
                (i, medians[i] or 0),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
            if row["job_s_median"] is None:
                bars[i].set_hatch("//")
        plain = by_key.get((workload, "plain"), {}).get("job_s_median")
        if plain:
            ax.axhline(plain, color="#de2d26", linestyle="--", linewidth=1, zorder=1, label=f"plain dir {plain:.1f} s")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_title(workload)
        ax.set_xticks(range(len(configs)), configs, rotation=20, ha="right", fontsize=9)
        ax.set_ylabel("job time, s (bar: median, dots: runs)")
        ax.set_ylim(0, top * 1.3)
        ax.grid(axis="y", alpha=0.3, zorder=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
