"""Publish's seconds per image per core at camera resolution, with the default output policy.

Usage (from the repository root):
    .venv/bin/python benchmarks/publish_night.py [--images 100] [--captures 20] [--resolution 2448x2048]
        [--repeats 3] [--baseline SRC] [--profile]

It writes ``--captures`` synthetic JPEG captures (`factory_night.make_night`) and a night of
``--images`` images over them (each capture under several names, so a 100-image night needs
20 files on disk), with a 16 x 16 patch-grid map per image as the tiny ViT at 224 px gives, a
pool store and the product's scores as the earlier stages write them: 2 % of the images flagged
(a planted defect each), the rest with sensor noise. Then it runs `publish.publish_block` over
the product's task blocks serially with one thread (as a Dask worker of the local cluster
runs; in a fresh process per repeat when comparing with a baseline), the default `OutputPolicy`
(full-size heatmaps for flagged images and the top 10 ranks, long side 1024 for the rest; JPEG
q85), and prints wall and CPU seconds per image. CPU seconds per image is publish's cost per
image per core (issue 12's target: at most 0.3 s at 2448 x 2048). It also prints the bytes
written under each output folder (masks, heatmaps, crops, maps) against the input's bytes
(each image's file counted once per image, as a night of distinct files would hold them).

``--baseline SRC`` (the repository at another commit, e.g. ``git worktree add /tmp/before
main``) alternates repeats between that code and this one and prints their ratio; both must
have ``ProductPlan.make`` and ``publish_block``. ``--profile`` prints one cProfile run of each,
by total time, on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from factory_night import make_night  # noqa: E402

GRID = (16, 16)
HERE = Path(__file__).resolve().parent.parent


def write_night(root: Path, n_images: int, n_captures: int, width: int, height: int) -> Path:
    """Captures, a pool store of patch maps and the spec a measuring process reads; returns the spec's path."""
    from musc_tasks.store import PoolLayout, create_pool_store, open_pool_store

    input_dir, _ = make_night(root, n_captures, width, height, seed=0)
    captures = sorted(input_dir.rglob("*.jpg"))[:n_captures]
    rng = np.random.default_rng(0)
    flagged = set(range(0, n_images, 50))  # 2 %
    records, images, maps = [], [], []
    for index in range(n_images):
        capture = captures[index % len(captures)]
        patch_map = rng.normal(0.0, 0.3, GRID)
        if index in flagged:
            patch_map[tuple(rng.integers(0, GRID[0], (2, 2)))] += 3.0  # two planted defects
        maps.append(patch_map.astype(np.float16))
        image_id = f"{index:064x}"
        records.append(
            {
                "image_id": image_id,
                "path": str(capture),
                "relpath": f"{index:04d}/{capture.name}",
                "width": width,
                "height": height,
                "status": "ok",
                "reason": None,
                "notes": [],
                "duplicate_of": None,
            }
        )
        score = 3.0 + rng.uniform() if index in flagged else 1.0 + 0.3 * rng.uniform()
        images.append(
            {"image_id": image_id, "pool_index": index, "pool_images": n_images, "raw_score": score, "score": score}
        )
    pool = root / "pool.zarr"
    create_pool_store(pool, PoolLayout(tuple(r["image_id"] for r in records), GRID, 1, 8), {})
    open_pool_store(pool, "r+")["patch_scores"][:] = np.stack(maps).reshape(n_images, -1).astype(np.float32)
    scores = {
        "product": "brick",
        "image_threshold": 2.0,
        "pixel_threshold": 1.5,
        "map_min": float(np.min(maps)),
        "map_max": float(np.max(maps)),
        "images": images,
    }
    spec = root / "night.json"
    spec.write_text(json.dumps({"records": records, "scores": scores, "pool": str(pool)}))
    return spec


def measure(spec_path: Path, profile: bool) -> dict:
    """Publish the spec's night serially in this process: wall and CPU seconds per image."""
    import torch

    from musc_tasks.manifests import ImageRecord
    from musc_tasks.publish import ProductPlan, publish_block
    from musc_tasks.rscin import ImageScore, ProductScores

    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    scores = ProductScores(**{**spec["scores"], "images": tuple(ImageScore(**i) for i in spec["scores"]["images"])})
    records = [ImageRecord(**r) for r in spec["records"]]
    with tempfile.TemporaryDirectory(prefix="musc-publish-out-") as out:
        plan = ProductPlan.make(
            Path(out), "2026-11-22", "brick", records, scores, [Path(spec["pool"])], backbone_key="tiny", run_id="b"
        )
        publish_block(plan, 0, 1)  # warm-up: first-call allocations and lazy imports
        profiler = cProfile.Profile() if profile else None
        wall, cpu = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        for start, stop in plan.blocks():
            publish_block(plan, start, stop)
        if profiler:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        written = {
            kind.name: [p.stat().st_size for p in kind.rglob("*") if p.is_file()] for kind in Path(out).iterdir()
        }
    if profiler:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    n = len(records)
    input_bytes = sum(Path(r.path).stat().st_size for r in records)
    return {"wall_per_image": wall / n, "cpu_per_image": cpu / n, "bytes": written, "input_bytes": input_bytes}


def bounded_overlay_psnr(spec_path: Path, n_captures: int) -> list[float]:
    """PSNR in dB of each capture's bounded heatmap overlay from a reduced decode against a full decode's."""
    from musc_tasks.config import OutputPolicy
    from musc_tasks.imageio import read_rgb, read_rgb_reduced
    from musc_tasks.publish import _overlay
    from musc_tasks.render import no_regions
    from musc_tasks.rscin import ProductScores

    spec = json.loads(spec_path.read_text())
    scores = ProductScores(**{**spec["scores"], "images": ()})
    policy = OutputPolicy()
    patch_map = np.zeros(GRID, np.float16)  # nothing above the threshold: the photo's pixels alone
    values = []
    for record in spec["records"][:n_captures]:
        full, _ = read_rgb(record["path"])
        reduced, size, _ = read_rgb_reduced(record["path"], policy.long_side)
        drawn = [
            _overlay(image, size, patch_map, None, None, no_regions(), scores, policy, full_size=False).astype(float)
            for image in (full, reduced)
        ]
        error = float(np.mean((drawn[0] - drawn[1]) ** 2))
        values.append(float("inf") if error == 0 else 10 * np.log10(255.0**2 / error))
    return values


def run_measure(source: Path | None, spec: Path, profile: bool = False) -> dict:
    """One measurement: in this process (``source`` None), or in a fresh one importing the package from ``source``."""
    if source is None:
        return measure(spec, profile)
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--measure", str(spec)] + (["--profile"] if profile else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring with {source} failed:\n{done.stderr[-4000:]}")
    if profile:
        print(done.stderr, file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="images in the night")
    parser.add_argument("--captures", type=int, default=20, help="distinct capture files the images are drawn from")
    parser.add_argument("--resolution", default="2448x2048", help="WIDTHxHEIGHT of the captures")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="repository root of the code to compare with")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one run of each code")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.profile)))
        return
    width, height = (int(v) for v in args.resolution.lower().split("x"))
    load_before = os.getloadavg()
    # Without a baseline, this process measures: one start-up fewer (the smoke test's cost is imports).
    variants = {"this": None} if args.baseline is None else {"baseline": args.baseline.resolve(), "this": HERE}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="musc-publish-night-") as tmp:
        spec_path = write_night(Path(tmp), args.images, args.captures, width, height)
        for name, source in variants.items() if args.profile else ():
            print(f"profile of {name} ({source or HERE}):", file=sys.stderr)
            run_measure(source, spec_path, profile=True)
        for _ in range(args.repeats):
            for name, source in variants.items():
                results[name].append(run_measure(source, spec_path))
        psnr = bounded_overlay_psnr(spec_path, min(args.captures, args.images))
    print(
        f"{args.images} images over {args.captures} JPEG captures of {width}x{height}, default output policy, "
        f"serial, one thread; repeats {args.repeats}"
    )
    print()
    print("| code | statistic | wall s/image | CPU s/image (per core) |")
    print("| --- | --- | --- | --- |")
    for name, runs in results.items():
        for statistic in (statistics.median, min):
            wall = statistic(r["wall_per_image"] for r in runs)
            cpu = statistic(r["cpu_per_image"] for r in runs)
            print(f"| {name} | {statistic.__name__} | {wall:.3f} | {cpu:.3f} |")
    for name, runs in results.items():
        written, input_bytes = runs[-1]["bytes"], runs[-1]["input_bytes"]
        kinds = ", ".join(
            f"{kind} {len(sizes)} files {sum(sizes) / 2**20:.2f} MiB ({sum(sizes) / input_bytes:.2%})"
            for kind, sizes in sorted(written.items())
        )
        print(f"{name}: input {input_bytes / 2**20:.1f} MiB; written {kinds}")
    if args.baseline is not None:
        ratios = [t["cpu_per_image"] / b["cpu_per_image"] for t, b in zip(results["this"], results["baseline"])]
        print()
        print(f"CPU per image, this / baseline, per repeat: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(
        f"bounded overlay, reduced vs full decode, PSNR dB over {len(psnr)} captures: "
        f"min {min(psnr):.1f}, median {statistics.median(psnr):.1f}"
    )
    print(f"load average before {[round(v, 1) for v in load_before]}, after {[round(v, 1) for v in os.getloadavg()]}")


if __name__ == "__main__":
    main()
