"""Mutual-scoring stage vs the in-memory core engine on the same tokens, as a ratio in one run.

Usage (from the repository root):
    .venv/bin/python benchmarks/msm_stage.py [--n 48 --length 576 --channels 128 --layers 2 --r 1 3 5]
                                             [--repeats 3] [--workers W] [--profile] [--json out.json]

Writes a synthetic float16 token store (as extraction does), then alternates, ``--repeats`` times:
- engine: `pool_patch_scores` on the pool's tokens held in memory in one process (LNAMD + MSM
  for every (r, layer), torch using as many threads as the stage has workers);
- stage in process: the stage's own pair and row tasks (`score_block_pair`, `assemble_row_block`)
  called one after another in this process, with the same threads: what the stage's tasks cost
  besides Dask (token reads, casts, LNAMD per task, similarity-table writes and reads);
- stage on Dask: `score_pools_with_dask` on a LocalCluster of single-threaded workers, started
  once before the repeats (its start is printed apart).
Prints the median seconds and the ratios to the engine, and checks the scores are equal.
``--profile`` adds a cProfile of one in-process stage run (top functions by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dask_scale import _warm_worker, write_synthetic_tokens  # noqa: E402

from musc_tasks.cluster import dask_client  # noqa: E402
from musc_tasks.config import MsmParams  # noqa: E402
from musc_tasks.core import pool_patch_scores  # noqa: E402
from musc_tasks.scoring import (  # noqa: E402
    assemble_row_block,
    open_pool,
    plan_pool,
    score_block_pair,
    score_pools_with_dask,
)
from musc_tasks.store import open_pool_store, read_token_rows  # noqa: E402


def stage_in_process(job) -> None:
    """Every pair task, then every row task, in this process (what a worker runs, minus Dask)."""
    n_blocks = job.layout.n_blocks
    pairs = [score_block_pair(job, a, b) for a in range(n_blocks) for b in range(a, n_blocks)]
    for a in range(n_blocks):
        assemble_row_block(job, a, *pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="images in the pool")
    parser.add_argument("--length", type=int, default=576, help="patches per image, a square")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--r", nargs="+", type=int, default=[1, 3, 5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="Dask workers; the engine gets as many threads")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    side = int(round(args.length**0.5))
    if side * side != args.length:
        raise SystemExit(f"--length must be a square, got {args.length}")
    grid, layers = (side, side), tuple(range(args.layers))
    msm = MsmParams(r_list=tuple(args.r), interval=0.3, precision="float32")
    torch.set_num_threads(args.workers)

    with tempfile.TemporaryDirectory(prefix="musc-msm-stage-") as tmp:
        token_path = Path(tmp) / "tokens.zarr"
        rows = write_synthetic_tokens(
            token_path, args.n, grid=grid, channels=args.channels, layers=layers, shard_images=8
        )
        ids = tuple(sorted(rows))
        token_rows = [rows[i] for i in ids]

        def job_in(folder: str):
            job = plan_pool(
                Path(tmp) / folder, ids, token_path, token_rows, grid=grid, n_layers=len(layers), msm=msm,
                backbone_key="synthetic", device="cpu",
            )  # fmt: skip
            open_pool(job)
            return job

        def engine() -> np.ndarray:
            tokens = [torch.from_numpy(t) for t in read_token_rows(token_path, token_rows)]
            with torch.inference_mode():
                return pool_patch_scores(tokens, grid, msm.r_list, interval=msm.interval).numpy()

        started = time.perf_counter()
        with dask_client(n_workers=args.workers) as client:
            cluster_seconds = time.perf_counter() - started
            client.run(_warm_worker)
            times: dict[str, list[float]] = {"engine": [], "stage in process": [], "stage on Dask": []}
            expected = engine()  # warm-up, and the scores every run must equal
            for repeat in range(args.repeats):
                started = time.perf_counter()
                engine()
                times["engine"].append(time.perf_counter() - started)

                job = job_in(f"serial-{repeat}")
                started = time.perf_counter()
                stage_in_process(job)
                times["stage in process"].append(time.perf_counter() - started)
                serial = open_pool_store(Path(job.pool_path))["patch_scores"][:]

                job = job_in(f"dask-{repeat}")
                started = time.perf_counter()
                score_pools_with_dask([job], client)
                times["stage on Dask"].append(time.perf_counter() - started)
                distributed = open_pool_store(Path(job.pool_path))["patch_scores"][:]
                for name, got in (("in process", serial), ("on Dask", distributed)):
                    if not np.allclose(got, expected, atol=1e-6, rtol=0):
                        raise SystemExit(
                            f"stage {name}: scores differ from the engine by {np.abs(got - expected).max()}"
                        )
        if args.profile:
            profile = cProfile.Profile()
            job = job_in("profiled")
            profile.runcall(stage_in_process, job)

    engine_median = statistics.median(times["engine"])
    print(
        f"pool N={args.n}, L={args.length}, C={args.channels}, {args.layers} layers x r {tuple(args.r)}, "
        f"task blocks of {job.layout.task_images} images ({job.layout.n_blocks} blocks); "
        f"{args.workers} workers / threads; LocalCluster start {cluster_seconds:.1f} s"
    )
    print()
    print("| run | median s | all repeats s | vs engine |")
    print("| --- | --- | --- | --- |")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        shown = " ".join(f"{s:.2f}" for s in seconds)
        print(f"| {name} | {median:.2f} | {shown} | {median / engine_median:.2f}x |")
    if args.profile:
        print()
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seconds": times}))


if __name__ == "__main__":
    main()
