"""Publish's work per capture with regions labelled in cells (now) or over the whole mask (before).

Usage (from the repository root):
    .venv/bin/python benchmarks/publish_regions.py [--images 8] [--resolution 2448x2048] [--repeats 3]

For N synthetic JPEG captures (`factory_night.make_night`) and a patch-grid map per capture
with planted defects (16 x 16, as the tiny ViT at 224 px gives), it runs what publish does for
one flagged image (decode, upsample the map, threshold the mask, write the mask PNG, region
rows, full-size heatmap overlay, JPEG encoding) with `render.region_rows` labelling the whole
mask (``working_side=None``, the code before) and in cells (the default), alternating, and
prints seconds per image of each, of the region step alone, their ratios (median and best
repeat), and the load average before and after (the machine is shared: read the ratios).
Both give the same rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from factory_night import make_night  # noqa: E402

from musc_tasks.imageio import read_rgb  # noqa: E402
from musc_tasks.maps import upsample_map  # noqa: E402
from musc_tasks.render import encode_image, heatmap_overlay, image_mask, region_rows, write_png  # noqa: E402

THRESHOLD = 1.5


def publish_one(path: Path, patch_map: np.ndarray, out: Path, working_side: int | None) -> tuple[float, dict]:
    """Publish's steps for one flagged capture; returns (seconds in region_rows, the rows)."""
    image, _ = read_rgb(path)
    pixel_scores = upsample_map(patch_map, (image.height, image.width))
    mask, _, _ = image_mask(pixel_scores, THRESHOLD, flagged=True)
    write_png(out / "mask.png", np.where(mask, np.uint8(255), np.uint8(0)))
    started = time.perf_counter()
    regions = region_rows(mask, pixel_scores, working_side=working_side)
    region_seconds = time.perf_counter() - started
    boxes = np.stack([regions[k] for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")], axis=-1)
    overlay = heatmap_overlay(
        np.asarray(image), pixel_scores, floor=THRESHOLD, vmax=float(patch_map.max()), mask=mask, boxes=boxes
    )
    (out / "heatmap.jpg").write_bytes(encode_image(overlay, "jpeg", 85))
    return region_seconds, regions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--resolution", default="2448x2048", help="WIDTHxHEIGHT of the captures")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    width, height = (int(v) for v in args.resolution.lower().split("x"))
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="musc-publish-") as tmp:
        root = Path(tmp)
        input_dir, _ = make_night(root, args.images, width, height, seed=0)
        captures = sorted(input_dir.rglob("*.jpg"))
        maps = []
        for _ in captures:
            patch_map = rng.normal(0.0, 0.6, (16, 16))
            patch_map[tuple(rng.integers(0, 16, (2, 2)))] += 3.0  # two planted defects
            maps.append(patch_map.astype(np.float16))
        variants = {"whole mask": None, "cells": 1024}
        for working_side in variants.values():  # warm-up: imports and first-call allocations
            publish_one(captures[0], maps[0], root, working_side)
        total = {name: [] for name in variants}
        regions = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, working_side in variants.items():
                started = time.perf_counter()
                region_seconds = 0.0
                for path, patch_map in zip(captures, maps):
                    seconds, rows = publish_one(path, patch_map, root, working_side)
                    region_seconds += seconds
                total[name].append((time.perf_counter() - started) / len(captures))
                regions[name].append(region_seconds / len(captures))
                n_regions = rows["bbox_x0"].size
    print(f"captures: {len(captures)} at {width}x{height}, repeats {args.repeats}, last image regions: {n_regions}")
    # the median, and the best repeat: on a shared machine the least disturbed one
    for statistic in (statistics.median, min):
        per_image = {name: statistic(values) for name, values in total.items()}
        region_step = {name: statistic(values) for name, values in regions.items()}
        print(f"{statistic.__name__} of repeats:")
        for name in variants:
            print(f"{name:>12}: publish {per_image[name]:.3f} s/image, region rows {region_step[name]:.3f} s/image")
        print(f"  publish cells / whole mask: {per_image['cells'] / per_image['whole mask']:.2f}")
        print(f"  region rows cells / whole mask: {region_step['cells'] / region_step['whole mask']:.3f}")
    print(f"load average before {[round(v, 1) for v in load_before]}, after {[round(v, 1) for v in os.getloadavg()]}")


if __name__ == "__main__":
    main()
