"""Mutual-scoring stage vs the in-memory core engine on the same tokens, as a ratio in one run.

Usage (from the repository root):
    .venv/bin/python benchmarks/msm_stage.py [--n 48 --length 576 --channels 128 --layers 2 --r 1 3 5]
                                             [--pools 1] [--repeats 3] [--workers W] [--profile] [--json out.json]

Writes a synthetic float16 token store (as extraction does) of ``--pools`` pools of ``--n`` images
(a small night: ``--pools 3 --n 30 --length 196 --channels 768`` is three products of 30 with a
ViT-B/16 at 224), then alternates, ``--repeats`` times:
- engine: `pool_patch_scores` on each pool's tokens held in memory in one process (LNAMD + MSM
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
import itertools
import json
import os
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
from musc_tasks.store import finish_pool_store, open_pool_store, read_token_rows  # noqa: E402


def stage_in_process(job) -> None:
    """Every pair task (diagonals first, as on Dask), then every row task, in this process (minus Dask)."""
    n_blocks = job.layout.n_blocks
    for a, b in [(a, a) for a in range(n_blocks)] + list(itertools.combinations(range(n_blocks), 2)):
        score_block_pair(job, a, b)
    for a in range(n_blocks):
        assemble_row_block(job, a)


def stage_in_process_finished(jobs) -> None:
    """`stage_in_process` of every pool, each finished (its scratch dropped) as on Dask."""
    for job in jobs:
        stage_in_process(job)
        finish_pool_store(Path(job.pool_path))


class SyntheticPools:
    """``n_pools`` pools of ``n`` random images in one float16 token store under ``folder``."""

    def __init__(self, folder: Path, args: argparse.Namespace, grid: tuple[int, int], msm: MsmParams) -> None:
        self.folder, self.grid, self.msm, self.n_layers = folder, grid, msm, args.layers
        self.task_images = args.task_images
        self.token_path = folder / "tokens.zarr"
        self.rows = write_synthetic_tokens(
            self.token_path, args.n * args.pools, grid=grid, channels=args.channels,
            layers=tuple(range(args.layers)), shard_images=8,
        )  # fmt: skip
        ids = tuple(sorted(self.rows))
        self.pools = [ids[p * args.n : (p + 1) * args.n] for p in range(args.pools)]

    def jobs_in(self, name: str) -> list:
        """Fresh pool stores (under ``name``) of every pool."""
        jobs = [
            plan_pool(
                self.folder / name, pool, self.token_path, [self.rows[i] for i in pool], grid=self.grid,
                n_layers=self.n_layers, msm=self.msm, backbone_key="synthetic", device="cpu",
                task_images=self.task_images,
            )
            for pool in self.pools
        ]  # fmt: skip
        for job in jobs:
            open_pool(job)
        return jobs

    def engine(self) -> np.ndarray:
        """Every pool's scores by the in-memory engine, pool after pool."""
        scores = []
        for pool in self.pools:
            tokens = [torch.from_numpy(t) for t in read_token_rows(self.token_path, [self.rows[i] for i in pool])]
            with torch.inference_mode():
                scores.append(pool_patch_scores(tokens, self.grid, self.msm.r_list, interval=self.msm.interval))
        return torch.cat(scores).numpy()


def stored_scores(jobs) -> np.ndarray:
    return np.concatenate([open_pool_store(Path(job.pool_path))["patch_scores"][:] for job in jobs])


def timed_repeats(night: SyntheticPools, client, repeats: int) -> dict[str, list[float]]:
    """Engine, stage in process and stage on Dask, alternating; exits unless all give the same scores."""
    times: dict[str, list[float]] = {"engine": [], "stage in process": [], "stage on Dask": []}
    expected = night.engine()  # warm-up, and the scores every run must equal
    for repeat in range(repeats):
        started = time.perf_counter()
        night.engine()
        times["engine"].append(time.perf_counter() - started)

        jobs = night.jobs_in(f"serial-{repeat}")
        started = time.perf_counter()
        stage_in_process_finished(jobs)
        times["stage in process"].append(time.perf_counter() - started)
        serial = stored_scores(jobs)

        jobs = night.jobs_in(f"dask-{repeat}")
        started = time.perf_counter()
        score_pools_with_dask(jobs, client)
        times["stage on Dask"].append(time.perf_counter() - started)
        for name, got in (("in process", serial), ("on Dask", stored_scores(jobs))):
            if not np.allclose(got, expected, atol=1e-6, rtol=0):
                raise SystemExit(f"stage {name}: scores differ from the engine by {np.abs(got - expected).max()}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="images in each pool")
    parser.add_argument("--pools", type=int, default=1, help="pools of --n images, scored in one stage run")
    parser.add_argument("--length", type=int, default=576, help="patches per image, a square")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--r", nargs="+", type=int, default=[1, 3, 5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="Dask workers; the engine gets as many threads")
    parser.add_argument("--task-images", type=int, default=None, help="images per task block (default: the stage's)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    side = int(round(args.length**0.5))
    if side * side != args.length:
        raise SystemExit(f"--length must be a square, got {args.length}")
    msm = MsmParams(r_list=tuple(args.r), interval=0.3, precision="float32")
    torch.set_num_threads(args.workers)

    with tempfile.TemporaryDirectory(prefix="musc-msm-stage-") as tmp:
        night = SyntheticPools(Path(tmp), args, (side, side), msm)
        started = time.perf_counter()
        with dask_client(n_workers=args.workers) as client:
            cluster_seconds = time.perf_counter() - started
            client.run(_warm_worker)
            times = timed_repeats(night, client, args.repeats)
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(stage_in_process_finished, night.jobs_in("profiled"))
        layout = night.jobs_in("layout")[0].layout

    engine_median = statistics.median(times["engine"])
    print(
        f"{args.pools} pool(s) of N={args.n}, L={args.length}, C={args.channels}, {args.layers} layers x r "
        f"{tuple(args.r)}, task blocks of {layout.task_images} images ({layout.n_blocks} blocks); "
        f"{args.workers} workers / threads; LocalCluster start {cluster_seconds:.1f} s; "
        f"load average {os.getloadavg()[0]:.1f}"
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
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seconds": times}))


if __name__ == "__main__":
    main()
