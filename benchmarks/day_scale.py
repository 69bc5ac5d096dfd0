"""Days of growing size through the real pipeline: peak memory and time per image at a fixed pool size.

Usage (from the repository root):
    .venv/bin/python benchmarks/day_scale.py [--images 200 2000] [--pool-size 200] [--json out.json]
    .venv/bin/python benchmarks/day_scale.py --smoke        # 12 and 24 images, pool 6 (CI)

For each day size it generates one product of that many synthetic photos (the demo's
generator), runs `musc score` on it as a user would (a fresh process with its own Prefect
ephemeral server and Dask LocalCluster, the tiny random ViT on the CPU) and samples, every
0.2 s, the resident memory of that process and of all its children (Dask workers). The
claims under test: peak memory is set by the pool and block sizes, not by the day; and the
work per image stays flat as the day grows, because the quadratic cost lives inside pools.
Stage seconds come from the run's own `runs` table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from musc_tasks import tables
from musc_tasks.demo import make_demo_day

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "musc_tasks" / "model_configs" / "musc-tiny-vit.json"
STAGES = ("catalog", "extract", "score", "rescore", "publish")


class TreeMemory:
    """Peak resident memory of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            sizes = []
            for process in processes:
                try:
                    sizes.append(process.memory_info().rss)
                except psutil.NoSuchProcess:
                    continue
            if sizes:
                self.peak_total = max(self.peak_total, sum(sizes))
                self.peak_single = max(self.peak_single, max(sizes))
            self._stop.wait(self.interval)


def one_product_day(root: Path, n_images: int, size: int, seed: int) -> Path:
    """A folder holding one product ("brick") of n_images photos, 5 % with planted defects."""
    day = make_demo_day(
        root, seed=seed, images_per_product=n_images, defects_per_product=max(1, n_images // 20), size=size
    )
    for other in ("coffee", "gravel"):
        shutil.rmtree(day.input_dir / other)
    return day.input_dir


def tiny_backbone_args(image_size: int) -> list[str]:
    """`musc score` options of the tiny random ViT the benchmarks run without weights."""
    return [
        *("--backbone", "musc-tiny-vit", "--model-config", str(TINY_CONFIG), "--pretrained", "none"),
        *("--image-size", str(image_size), "--layers", "1,3"),
    ]


def offline_env(**more: str) -> dict[str, str]:
    """The environment for a `musc` or `prefect` command: this one's, offline, no analytics, no UI, no API URL."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        NO_PROXY="127.0.0.1,localhost",
        **more,
    )
    env.pop("PREFECT_API_URL", None)
    return env


def run_musc_score(
    command: list[str], out_dir: Path, prefect_api: str | None = None, prefect_home: Path | None = None
) -> dict:
    """Run one `musc score` command; wall and CPU seconds, peak memory, the run row.

    The run row's stage seconds are the work; the wall time also holds the fixed start
    (Prefect's ephemeral server unless ``prefect_api`` names a running one, the Dask cluster).
    ``prefect_home`` is the Prefect home to run in (default: a fresh one, whose ephemeral server
    first creates and migrates its database: about 30 s on this machine, once per home).
    """
    env = offline_env()
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    with contextlib.ExitStack() as cleanup:
        home = prefect_home or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="musc-benchmark-home-"))
        env["PREFECT_HOME"] = str(home)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with TreeMemory(process.pid) as memory:
            output, _ = process.communicate()
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(f"musc score failed ({process.returncode}):\n{output[-4000:]}")
    run = tables.read_table(out_dir / "tables" / "runs").iloc[-1]
    return {
        "seconds": seconds,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_tree_rss_mib": memory.peak_total / 2**20,
        "peak_process_rss_mib": memory.peak_single / 2**20,
        "n_scored": int(run["n_scored"]),
        "n_flagged": int(run["n_flagged"]),
        **{f"seconds_{stage}": float(run[f"seconds_{stage}"]) for stage in STAGES},
    }


def add_prefect_api_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefect-api",
        help="a running Prefect server's API URL (a site's, or the test suite's) instead of an ephemeral one per run",
    )


def score_day(input_dir: Path, out_dir: Path, args: argparse.Namespace) -> dict:
    command = [str(Path(sys.executable).parent / "musc"), "score", str(input_dir), "--out", str(out_dir)]
    command += ["--date", "2026-11-22", "--device", "cpu", "--pool-size", str(args.pool_size)]
    return run_musc_score(command + tiny_backbone_args(args.size), out_dir, args.prefect_api)


def stage_seconds(result: dict) -> float:
    return sum(result[f"seconds_{stage}"] for stage in STAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", type=int, default=[200, 2000], help="day sizes (one product)")
    parser.add_argument("--pool-size", type=int, default=200)
    parser.add_argument("--size", type=int, default=112, help="image side for the tiny ViT (multiple of 14)")
    parser.add_argument("--smoke", action="store_true", help="12 and 24 images, pool 6")
    parser.add_argument("--json", type=Path, default=None)
    add_prefect_api_option(parser)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.pool_size = [12, 24], 6
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    results = []
    with tempfile.TemporaryDirectory(prefix="musc-day-scale-") as tmp:
        for n_images in args.images:
            input_dir = one_product_day(Path(tmp) / f"day-{n_images}", n_images, args.size, seed=n_images)
            result = score_day(input_dir, Path(tmp) / f"out-{n_images}", args)
            if result["n_scored"] != n_images:
                raise SystemExit(f"{n_images} images in, {result['n_scored']} scored")
            results.append({"images": n_images, **result})

    print(
        f"one product, pool size {args.pool_size}, tiny ViT at {args.size} px on the CPU; "
        f"load average before {load_before}"
    )
    print()
    print(
        "| images | pools | wall s | ms/image (wall) | ms/image (stages) | extract | score | publish "
        "| peak RSS all processes MiB | peak RSS one process MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        n = r["images"]
        pools = -(-n // args.pool_size)
        print(
            f"| {n} | {pools} | {r['seconds']:.1f} | {1e3 * r['seconds'] / n:.1f} | {1e3 * stage_seconds(r) / n:.1f} | "
            f"{1e3 * r['seconds_extract'] / n:.2f} | {1e3 * r['seconds_score'] / n:.2f} | "
            f"{1e3 * r['seconds_publish'] / n:.2f} | {r['peak_tree_rss_mib']:.0f} | {r['peak_process_rss_mib']:.0f} |"
        )
    first, last = results[0], results[-1]
    print()
    # Wall time also holds a fixed start (Prefect's ephemeral server, the Dask cluster); the
    # stages' own seconds are the work that must stay linear in the day.
    print(
        f"time per image in the stages, {last['images']} vs {first['images']} images: "
        f"{(stage_seconds(last) / last['images']) / (stage_seconds(first) / first['images']):.2f}x; "
        f"wall: {(last['seconds'] / last['images']) / (first['seconds'] / first['images']):.2f}x; "
        f"peak RSS (all processes): {last['peak_tree_rss_mib'] / first['peak_tree_rss_mib']:.2f}x"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"pool_size": args.pool_size, "size": args.size, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
