"""A whole night on 1, 2 and 4 Dask worker processes: extraction + mutual scoring + publish.

Usage (from the repository root):
    .venv/bin/python benchmarks/cluster_scale.py [--workers 1 2 4] [--products 3 --images 24]
                                                 [--dask-address tcp://scheduler:8786] [--json out.json]
                                                 [-- <musc score backbone options>]

Generates a synthetic day (`musc demo`'s generator: products with planted defects), then runs
`musc score` once per cluster size into a fresh OUT: on a LocalCluster of that many
single-threaded worker processes started here, or once on the cluster at ``--dask-address``
(OUT then goes under ``--out``, which must be storage that cluster's workers share). Reports
the seconds of each stage from the run's own table (Prefect start-up excluded), the speed-up
over the first size, and checks that every run gave identical scores. The backbone defaults
to the tests' tiny random ViT at 112 px; pass real options after ``--`` (``--preset paper``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from musc_tasks import tables
from musc_tasks.cluster import start_local_cluster
from musc_tasks.demo import make_demo_day

sys.path.insert(0, str(Path(__file__).resolve().parent))
from day_scale import tiny_backbone_args  # noqa: E402

TINY = [*tiny_backbone_args(112), "--device", "cpu"]
STAGES = ("extract", "score", "publish")


def run_night(input_dir: Path, out_dir: Path, address: str, backbone_args: list[str]) -> dict:
    """One `musc score` into ``out_dir`` on the cluster at ``address``; its stage seconds and scores."""
    command = [str(Path(sys.executable).parent / "musc"), "score", str(input_dir), "--out", str(out_dir)]
    command += ["--date", "2026-11-20", "--dask-address", address, *backbone_args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, MUSC_PROGRESS="0"))
    if done.returncode != 0:
        raise SystemExit(f"musc score failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run = tables.read_table(out_dir / "tables" / "runs").iloc[-1]
    scores = tables.read_table(out_dir / "tables" / "scores")[["path", "raw_score", "score", "rank"]]
    return {
        "wall_s": time.perf_counter() - started,
        **{stage: float(run[f"seconds_{stage}"]) for stage in STAGES},
        "scores": scores.sort_values("path").reset_index(drop=True),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--products", type=int, default=3, help="the demo's products to keep (it makes 3)")
    parser.add_argument("--images", type=int, default=24, help="images per product")
    parser.add_argument("--dask-address", help="an existing cluster: one run there instead of local sizes")
    parser.add_argument("--out", type=Path, help="where the runs write (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    args, backbone_args = parser.parse_known_args(argv)
    backbone_args = [a for a in backbone_args if a != "--"] or TINY
    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        root = Path(scratch)
        day = make_demo_day(root / "input", seed=0, images_per_product=args.images, defects_per_product=2)
        products = sorted(p.name for p in day.input_dir.iterdir())[: args.products]
        for extra in (p for p in day.input_dir.iterdir() if p.name not in products):
            shutil.rmtree(extra)
        results = {}
        if args.dask_address:
            results["cluster"] = run_night(day.input_dir, root / "out-cluster", args.dask_address, backbone_args)
        for workers in [] if args.dask_address else args.workers:
            with start_local_cluster(n_workers=workers) as cluster:  # the run's own kind of local cluster
                results[workers] = run_night(
                    day.input_dir, root / f"out-{workers}", cluster.scheduler_address, backbone_args
                )
    first = next(iter(results.values()))
    n_images = len(first["scores"])
    print(f"{n_images} images, {len(products)} products; seconds from the runs table (Prefect start-up excluded)")
    print("| workers | extract s | score s | publish s | three stages s | speed-up | scores identical |")
    print("|---|---|---|---|---|---|---|")
    base = sum(first[s] for s in STAGES)
    for workers, result in results.items():
        total = sum(result[s] for s in STAGES)
        same = result["scores"].equals(first["scores"])
        print(
            f"| {workers} | {result['extract']:.2f} | {result['score']:.2f} | {result['publish']:.2f} "
            f"| {total:.2f} | {base / total:.2f}x | {same} |"
        )
        if not same:
            raise SystemExit(f"{workers} workers gave other scores than {next(iter(results))}")
    if args.json:
        rows = [{"workers": w, **{k: v for k, v in r.items() if k != "scores"}} for w, r in results.items()]
        args.json.write_text(json.dumps({"images": n_images, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
