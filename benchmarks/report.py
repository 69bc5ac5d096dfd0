"""The morning report of a large night with a long history: build time, memory, thumbnail sizes.

Usage (from the repository root):
    .venv/bin/python benchmarks/report.py [--images 1000] [--products 3] [--nights 90] [--side 2048] [--no-crops]
    .venv/bin/python benchmarks/report.py --smoke        # 40 images, 2 products, 3 nights, 256 px (CI)

It writes a results folder as the pipeline would leave it: score and run tables for every
night, and for the last night region rows, heatmap PNGs, region crops (none with
``--no-crops``, as in nights published before crops) and captures of the parts the gallery
shows (photos cut from scikit-image's bundled images, so they compress like photos, not like
noise). Then it builds the last night's report twice, each in a fresh process: cold (every
thumbnail and chart made) and warm (a rebuild, thumbnails reused), and reports seconds, the
building processes' peak memory and the sizes of the thumbnails and of the report folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from musc_tasks import tables
from musc_tasks.atomic import write_atomic
from musc_tasks.render import crop_box, encode_crop, heatmap_overlay, write_png
from musc_tasks.report import GALLERY_MAX, GALLERY_TOP, build_day_report

LAST_NIGHT = date(2026, 11, 22)
FLAG_SHARE = 0.03


def image_id(night: str, product: str, index: int) -> str:
    """A sha256 hex, as the pipeline's content hashes are."""
    return hashlib.sha256(f"{night}/{product}/{index}".encode()).hexdigest()


def photo(rng: np.random.Generator, side: int) -> np.ndarray:
    """A (side * 0.83, side, 3) uint8 crop of a bundled photo at a random offset."""
    source = Image.fromarray(skdata.astronaut() if rng.random() < 0.5 else skdata.coffee())
    height = int(side * 0.83)
    big = np.asarray(source.resize((side + 64, height + 64), Image.Resampling.BILINEAR))
    top, left = rng.integers(0, 64, size=2)
    return np.ascontiguousarray(big[top : top + height, left : left + side])


def write_out(out: Path, images: int, products: int, nights: int, side: int, seed: int = 0, crops: bool = True) -> None:
    rng = np.random.default_rng(seed)
    backbone, run_id = "bench-backbone", "bench-run"
    for back in range(nights - 1, -1, -1):
        night = (LAST_NIGHT - timedelta(days=back)).isoformat()
        for index in range(products):
            product = f"product-{index}"
            scores = rng.gamma(2.0, 0.1, images)
            threshold = float(np.quantile(scores, 1 - FLAG_SHARE))
            order = np.argsort(-scores, kind="stable")
            ranks = np.empty(images, int)
            ranks[order] = np.arange(1, images + 1)
            shown = (
                set(order[: min(GALLERY_MAX, max(GALLERY_TOP, int(FLAG_SHARE * images) + 1))]) if back == 0 else set()
            )
            rows, regions = [], []
            for i in range(images):
                path = out / "input" / night / product / f"{i:05d}.png"
                heat = f"heatmaps/{night}/{product}/{backbone}/{i:05d}.png"
                if i in shown:
                    capture = photo(rng, side)
                    write_png(path, capture)
                    coarse = Image.fromarray(rng.random((16, 16)).astype(np.float32))  # smooth, like MuSc's maps
                    score_map = np.asarray(coarse.resize(capture.shape[1::-1], Image.Resampling.BILINEAR))
                    write_png(out / heat, heatmap_overlay(capture, score_map, floor=0.8, vmax=1.0))
                    for region in range(1, int(rng.integers(1, 4)) + 1):
                        x0, y0 = (int(v) for v in rng.integers(0, side // 2, 2))
                        bbox = (x0, y0, x0 + side // 10, y0 + side // 12)
                        crop_rel = f"crops/{night}/{product}/{backbone}/{i:05d}/{region}.jpg"
                        if crops:
                            left, top, right, bottom = crop_box(bbox, (capture.shape[1], capture.shape[0]))
                            write_atomic(out / crop_rel, encode_crop(capture[top:bottom, left:right]))
                        regions.append(
                            {
                                "image_id": image_id(night, product, i),
                                "path": str(path),
                                "region": region,
                                **dict(zip(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"), bbox)),
                                "area_px": side * side // 120,
                                "area_fraction": 1 / 120,
                                "max_score": 0.9,
                                "mean_score": 0.7,
                                "centroid_x": float(x0 + side // 20),
                                "centroid_y": float(y0 + side // 24),
                                "backbone_key": backbone,
                                "run_id": run_id,
                                "crop_path": str(out / crop_rel) if crops else None,
                            }
                        )
                rows.append(
                    {
                        "image_id": image_id(night, product, i),
                        "path": str(path),
                        "width": side,
                        "height": int(side * 0.83),
                        "score": float(scores[i]),
                        "raw_score": float(scores[i]),
                        "rank": int(ranks[i]),
                        "flagged": bool(scores[i] > threshold),
                        "image_threshold": threshold,
                        "pixel_threshold": 0.8,
                        "heatmap_min": 0.8,
                        "heatmap_max": 1.0,
                        "pool_index": 0,
                        "pool_images": images,
                        "anomalous_fraction": 0.01,
                        "mask_path": heat.replace("heatmaps/", "masks/"),
                        "heatmap_path": heat,
                        "backbone_key": backbone,
                        "run_id": run_id,
                        "status": "scored",
                    }
                )
            rows.append(
                {
                    "image_id": image_id(night, product, -1),
                    "path": str(out / "input" / "bad.png"),
                    "backbone_key": backbone,
                    "run_id": run_id,
                    "status": "failed",
                    "error": "zero-byte file",
                }
            )
            partition = {"date": night, "product": product}
            tables.publish_partition(
                out / "tables" / "scores",
                partition,
                backbone,
                tables.to_table(rows, tables.SCORES_SCHEMA),
                tables.SCORES_SCHEMA,
            )
            tables.publish_partition(
                out / "tables" / "regions",
                partition,
                backbone,
                tables.to_table(regions, tables.REGIONS_SCHEMA),
                tables.REGIONS_SCHEMA,
            )
        now = datetime.now(timezone.utc)
        run = {
            "run_id": f"{run_id}-{night}",
            "started_at": now,
            "finished_at": now,
            "backbone_key": backbone,
            "parameters": json.dumps({"backbone": {"name": "bench"}, "scoring": {}}),
            "versions": "{}",
            "input_dir": str(out / "input" / night),
            "n_images": products * (images + 1),
            "n_scored": products * images,
            "n_flagged": 0,
            "n_failed": products,
            "seconds_catalog": 1.0,
            "seconds_extract": 1.0,
            "seconds_score": 1.0,
            "seconds_rescore": 1.0,
            "seconds_publish": 1.0,
            "images_extracted": 0,
            "images_token_cached": 0,
            "pairs_computed": 0,
            "pairs_cached": 0,
            "status": "completed",
        }
        tables.publish_partition(
            out / "tables" / "runs",
            {"date": night},
            run["run_id"],
            tables.to_table([run], tables.RUNS_SCHEMA),
            tables.RUNS_SCHEMA,
        )


def timed_build(out: Path) -> tuple[float, float, Path]:
    """Seconds to build the last night's report, this process's peak MiB, and the report's path."""
    began = time.perf_counter()
    report = build_day_report(out, LAST_NIGHT.isoformat())
    seconds = time.perf_counter() - began
    # VmHWM: the peak of this process's own memory since exec (getrusage's maxrss would also
    # count the pages shared with the parent between fork and exec).
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return seconds, peak_kib / 1024, report.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images per product and night")
    parser.add_argument("--products", type=int, default=3)
    parser.add_argument("--nights", type=int, default=90, help="nights of history in the tables")
    parser.add_argument("--side", type=int, default=2048, help="width of the captures of the last night")
    parser.add_argument("--no-crops", action="store_true", help="no region crops, as nights published before them")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.products, args.nights, args.side = 40, 2, 3, 256
    with tempfile.TemporaryDirectory(prefix="musc-report-bench-") as tmp:
        out = Path(tmp)
        began = time.perf_counter()
        write_out(out, args.images, args.products, args.nights, args.side, crops=not args.no_crops)
        setup = time.perf_counter() - began
        # Each build in a fresh process, so its peak memory is its own, not the setup's.
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            cold, peak_mib, report_path = pool.apply(timed_build, (out,))
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            warm, _, _ = pool.apply(timed_build, (out,))
        jpegs = list(report_path.parent.rglob("*.jpg"))
        thumbs = sorted(p.stat().st_size for p in jpegs if not p.name.endswith("-crop.jpg"))  # capture, overlay
        crop_thumbs = sum(1 for p in jpegs if p.name.endswith("-crop.jpg"))
        folder = sum(p.stat().st_size for p in report_path.parent.rglob("*") if p.is_file())
        result = {
            "images_per_product": args.images,
            "products": args.products,
            "nights": args.nights,
            "capture_side": args.side,
            "gallery_parts": len(thumbs) // 2,
            "crop_thumbnails": crop_thumbs,
            "setup_s": round(setup, 1),
            "cold_s": round(cold, 2),
            "warm_s": round(warm, 2),
            "peak_rss_mib": round(peak_mib),
            "thumb_kb_median": round(thumbs[len(thumbs) // 2] / 1024, 1),
            "thumb_kb_max": round(thumbs[-1] / 1024, 1),
            "report_folder_kb": round(folder / 1024),
        }
    print(
        "| images x products | nights | capture px | gallery parts | crop thumbnails | cold s | rebuild s | peak MiB "
        "| thumbnail KB (median, max) | report folder KB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.images} x {args.products} | {args.nights} | {args.side} | {result['gallery_parts']} | "
        f"{crop_thumbs} | "
        f"{result['cold_s']} | {result['warm_s']} | {result['peak_rss_mib']} | "
        f"{result['thumb_kb_median']}, {result['thumb_kb_max']} | {result['report_folder_kb']} |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
