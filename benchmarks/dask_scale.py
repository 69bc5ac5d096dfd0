"""Dask scale-out of mutual scoring: the real pair/row task graph on 1 vs 2 single-threaded workers.

Usage (from the repository root):
    .venv/bin/python benchmarks/dask_scale.py [--n 24 --length 576 --channels 768 --task-images B]
                                              [--layers 2] [--r 1 3] [--workers 1 2] [--json out.json]

Writes a synthetic token store with `musc_tasks.store` (float16, as extraction writes it),
creates one pool store per run, and times `score_pools_with_dask` on a fresh LocalCluster of
each size (cluster start and worker imports are not timed). The default shapes and the
pipeline's own task block size (`auto_task_images`: 6 images: 10 pair tasks) make every pair task several GEMMs of
(6*576, 768) x (768, 6*576) rows, so the graph is compute-bound and should scale with cores.
Prints the speed-up over one worker and checks that every run gave the same patch scores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from musc_tasks.cluster import dask_client
from musc_tasks.config import MsmParams
from musc_tasks.scoring import auto_task_images, open_pool, plan_pool, score_pools_with_dask
from musc_tasks.store import (
    TokenLayout,
    open_pool_store,
    prepare_token_store,
    token_index,
    write_token_block,
)


def write_synthetic_tokens(
    store_path: Path,
    n_images: int,
    *,
    grid: tuple[int, int],
    channels: int,
    layers: tuple[int, ...],
    shard_images: int,
    embed_dim: int = 32,
    seed: int = 0,
) -> dict[str, int]:
    """A token store of ``n_images`` random images, block by block; returns image id -> row.

    Raw tokens share a common part (as images of one product do), so LNAMD output is not
    near-orthogonal noise. Memory stays at one block whatever ``n_images`` is.
    """
    layout = TokenLayout(layers=layers, grid=grid, channels=channels, embed_dim=embed_dim, shard_images=shard_images)
    length = grid[0] * grid[1]
    n_blocks = -(-n_images // shard_images)
    group = prepare_token_store(store_path, layout, n_blocks * shard_images)
    rng = np.random.default_rng(seed)
    common = [rng.standard_normal((1, length, channels), dtype=np.float32) for _ in layers]
    for block in range(n_blocks):
        count = min(shard_images, n_images - block * shard_images)
        ids = [f"img{block * shard_images + i:06d}" for i in range(count)]
        layer_tokens = [
            shared + 0.5 * rng.standard_normal((count, length, channels), dtype=np.float32) for shared in common
        ]
        embeddings = rng.standard_normal((count, embed_dim), dtype=np.float32)
        write_token_block(group, store_path, block, ids, layer_tokens, embeddings)
    return token_index(store_path)


def _warm_worker() -> int:
    """Import the scoring code and run one GEMM in a worker, so imports are not timed."""
    import torch

    import musc_tasks.scoring  # noqa: F401

    torch.ones(64, 64) @ torch.ones(64, 64)
    return torch.get_num_threads()


def _worker_peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="images in the pool")
    parser.add_argument("--length", type=int, default=576, help="patches per image, a square")
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument(
        "--task-images", type=int, default=None, help="images per task block; default as the pipeline picks"
    )
    parser.add_argument("--layers", type=int, default=2, help="feature layers in the store")
    parser.add_argument("--r", nargs="+", type=int, default=[1, 3], help="LNAMD aggregation degrees")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    side = int(round(args.length**0.5))
    if side * side != args.length:
        raise SystemExit(f"--length must be a square, got {args.length}")
    grid = (side, side)
    args.task_images = args.task_images or auto_task_images(args.length, args.n)
    layers = tuple(range(args.layers))
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    with tempfile.TemporaryDirectory(prefix="musc-dask-scale-") as tmp:
        token_path = Path(tmp) / "tokens.zarr"
        started = time.perf_counter()
        rows = write_synthetic_tokens(
            token_path, args.n, grid=grid, channels=args.channels, layers=layers, shard_images=args.task_images
        )
        write_seconds = time.perf_counter() - started
        ids = tuple(sorted(rows))
        n_blocks = -(-args.n // args.task_images)
        n_pairs = n_blocks * (n_blocks + 1) // 2
        flops = 0
        for a in range(n_blocks):
            for b in range(a, n_blocks):
                rows_a = min(args.task_images, args.n - a * args.task_images)
                rows_b = min(args.task_images, args.n - b * args.task_images)
                flops += 2 * rows_a * rows_b * args.length**2 * args.channels
        flops *= len(args.r) * len(layers)

        runs, reference_scores = [], None
        for workers in args.workers:
            job = plan_pool(
                Path(tmp) / f"pools-{workers}",
                ids,
                token_path,
                [rows[i] for i in ids],
                grid=grid,
                n_layers=len(layers),
                msm=MsmParams(r_list=tuple(args.r), interval=0.3, precision="float32"),
                backbone_key="synthetic",
                task_images=args.task_images,
                device="cpu",
            )
            open_pool(job)
            with dask_client(n_workers=workers) as client:
                threads = sorted(set(client.run(_warm_worker).values()))
                started = time.perf_counter()
                score_pools_with_dask([job], client)
                seconds = time.perf_counter() - started
                worker_rss = max(client.run(_worker_peak_rss_mib).values())
            scores = open_pool_store(Path(job.pool_path))["patch_scores"][:]
            if reference_scores is None:
                reference_scores = scores
            runs.append(
                {
                    "workers": workers,
                    "seconds": seconds,
                    "gflops": flops / seconds / 1e9,
                    "torch_threads_per_worker": threads,
                    "worker_peak_rss_mib": worker_rss,
                    "max_abs_diff_vs_first": float(np.abs(scores - reference_scores).max()),
                }
            )

    base = runs[0]["seconds"]
    print(
        f"pool N={args.n}, L={args.length}, C={args.channels}, task blocks of {args.task_images} images, "
        f"{len(layers)} layers x r {tuple(args.r)}: {n_pairs} pair tasks + {n_blocks} row tasks, "
        f"{flops / 1e9:.0f} GFLOP; token store written in {write_seconds:.1f} s; load average before {load_before}"
    )
    print()
    print("| workers (1 thread each) | seconds | GFLOP/s | speed-up vs first | worker peak RSS MiB | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in runs:
        print(
            f"| {run['workers']} | {run['seconds']:.2f} | {run['gflops']:.1f} | {base / run['seconds']:.2f}x | "
            f"{run['worker_peak_rss_mib']:.0f} | {run['max_abs_diff_vs_first']:.1e} |"
        )
        run["speedup"] = base / run["seconds"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
