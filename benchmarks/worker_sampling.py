"""The extraction stage on the run's kind of LocalCluster, with and without Dask's dashboard sampling.

Usage (from the repository root):
    .venv/bin/python benchmarks/worker_sampling.py [--images-per-product 24] [--rounds 3]   # tiny ViT at 224
    .venv/bin/python benchmarks/worker_sampling.py -- --backbone ViT-B-16 --pretrained none --image-size 224

It writes a night of the demo's photos (3 products) and catalogues it, then alternates, ``--rounds`` times, two
2-worker clusters started by `cluster.start_local_cluster`: one with Dask's defaults for the
dashboard (each worker samples its task thread's stack every 10 ms for the profile, each server
checks its event loop every 20 ms) and one as the run starts it (`cluster.NO_DASHBOARD_SAMPLING`).
Each warms its workers (`warm_worker`), then runs `extract.extract_catalog` on the night into a
fresh folder. Printed per run: the stage's wall clock and the CPU seconds of the workers' main
threads (their event loops: the sampling's cost) and of their other threads (the task thread, the
decoding threads). CPU seconds are read from /proc, so a shared machine's noise moves them far
less than the wall clock. The backbone options after ``--`` are `musc score`'s (default: the tiny ViT
at 224 px, random weights).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of the calling process: its main thread and all its other threads."""
    seconds = {"main": 0.0, "other": 0.0}
    ticks = os.sysconf("SC_CLK_TCK")
    for thread in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{thread}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        seconds["main" if int(thread) == os.getpid() else "other"] += (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def main() -> None:
    import dask
    from day_scale import tiny_backbone_args
    from distributed import Client

    from flows.score import token_geometry
    from musc_tasks import cluster
    from musc_tasks.catalog import catalog_manifest, scan_input
    from musc_tasks.cli import backbone_from_args, build_parser
    from musc_tasks.demo import make_demo_day
    from musc_tasks.extract import extract_catalog

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-product", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args, score_options = parser.parse_known_args()
    score_options = [option for option in score_options if option != "--"] or tiny_backbone_args(224)
    n = args.images_per_product
    root = Path(tempfile.mkdtemp(prefix="worker-sampling-"))
    day = make_demo_day(root, seed=n, images_per_product=n, defects_per_product=max(1, n // 10))
    spec = backbone_from_args(build_parser().parse_args(["score", str(day.input_dir), "--out", "x", *score_options]))
    catalog = catalog_manifest(scan_input(day.input_dir), root, "2026-12-03")  # the catalog stage's own
    print(f"{catalog.n_files} images, {spec.name} at {spec.image_size} px, 2 workers of 1 thread")
    as_the_run_starts_it = cluster.NO_DASHBOARD_SAMPLING
    dask_defaults = {key: dask.config.get(key) for key in as_the_run_starts_it}
    for round_ in range(1, args.rounds + 1):
        for label, sampling in (("Dask's defaults", dask_defaults), ("the run's", as_the_run_starts_it)):
            cluster.NO_DASHBOARD_SAMPLING = sampling  # read by start_local_cluster as it starts the cluster
            with cluster.start_local_cluster(2) as local, Client(local) as client:
                for worker in client.scheduler_info()["workers"]:
                    client.submit(cluster.warm_worker, spec, "auto", workers=[worker], pure=False).result()
                before = client.run(thread_cpu_seconds)
                clock = time.perf_counter()
                extract_catalog(catalog, spec, token_geometry(spec), tempfile.mkdtemp(dir=root), client, device="auto")
                wall = time.perf_counter() - clock
                after = client.run(thread_cpu_seconds)
            cpu = {part: sum(after[w][part] - before[w][part] for w in after) for part in ("main", "other")}
            print(
                f"round {round_}, {label:15}: stage {wall:6.2f} s; workers' CPU s: main threads {cpu['main']:5.2f}, "
                f"other threads {cpu['other']:6.2f}",
                flush=True,
            )


if __name__ == "__main__":  # the workers are spawned and import this module: nothing at import time
    main()
