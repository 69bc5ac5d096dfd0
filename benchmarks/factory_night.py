"""A factory night: N synthetic JPEG captures at camera resolution through `musc score`.

Usage (from the repository root):
    .venv/bin/python benchmarks/factory_night.py [--images 1000] [--resolution 2448x2048] [--json out.json]
    .venv/bin/python benchmarks/factory_night.py --preset fast --images 100   # where weights exist

It writes one product of N captures (the demo's photos with planted defects, enlarged to the
resolution with a fine sensor-like texture, JPEG quality 90, as a camera writes them), runs
`musc score` on them as a user would (a fresh process, its own Prefect ephemeral server and
Dask LocalCluster; the tiny random ViT unless `--backbone`/`--preset` says otherwise), and
prints seconds per image of every stage, the CPU utilisation of the whole process tree
(user + system seconds of the run and its workers over wall seconds and cores), its peak
memory, and the bytes written per output kind against the input's bytes. With `--check` it
also asserts that every image was scored and every mask and heatmap exists (the e2e suite
runs a few 5-MP captures this way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from day_scale import STAGES, add_prefect_api_option, run_musc_score, tiny_backbone_args  # noqa: E402

from musc_tasks import tables  # noqa: E402
from musc_tasks.demo import make_demo_day  # noqa: E402

OUTPUT_KINDS = ("tables", "masks", "heatmaps", "crops", "maps")


def make_night(
    root: Path, n_images: int, width: int, height: int, seed: int, products: tuple[str, ...] = ("brick",)
) -> tuple[Path, int]:
    """n_images JPEG captures per product (the demo's), 5 % with planted defects; returns (folder, bytes)."""
    day = make_demo_day(
        root / "demo", seed=seed, images_per_product=n_images, defects_per_product=max(1, n_images // 20), size=256
    )
    rng = np.random.default_rng(seed)
    total = 0
    for image in day.images:
        if image.product not in products:
            continue
        with Image.open(image.path) as small:
            large = np.asarray(small.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), np.int16)
        texture = rng.normal(0.0, 4.0, (height, width, 1)).astype(np.int16)
        pixels = np.clip(large + texture, 0, 255).astype(np.uint8)
        folder = root / "input" / image.product
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / (Path(image.path).stem + ".jpg")
        Image.fromarray(pixels).save(target, format="JPEG", quality=90)
        total += target.stat().st_size
    return root / "input", total


def score_command(input_dir: Path, out_dir: Path, args: argparse.Namespace) -> list[str]:
    command = [str(Path(sys.executable).parent / "musc"), "score", str(input_dir), "--out", str(out_dir)]
    command += ["--date", "2026-11-22", "--device", args.device]
    if args.preset:
        return command + ["--preset", args.preset]
    if args.backbone:
        return command + ["--backbone", args.backbone]
    return command + tiny_backbone_args(args.image_size)


def run_night(input_dir: Path, out_dir: Path, args: argparse.Namespace) -> dict:
    result = run_musc_score(score_command(input_dir, out_dir, args), out_dir, args.prefect_api)
    return {**result, **{f"bytes_{kind}": folder_bytes(out_dir / kind) for kind in OUTPUT_KINDS}}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def check_outputs(out_dir: Path, n_images: int) -> None:
    scores = tables.read_table(out_dir / "tables" / "scores")
    if len(scores) != n_images or not (scores["status"] == "scored").all():
        raise SystemExit(f"{n_images} captures in, {int((scores['status'] == 'scored').sum())} scored")
    for row in scores.itertuples():
        with Image.open(row.path) as capture, Image.open(out_dir / row.mask_path) as mask:
            if mask.size != capture.size:
                raise SystemExit(f"{row.mask_path}: mask {mask.size} for a capture of {capture.size}")
        if not (out_dir / row.heatmap_path).is_file():
            raise SystemExit(f"missing heatmap {row.heatmap_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--resolution", default="2448x2048", help="WIDTHxHEIGHT of the captures")
    parser.add_argument("--image-size", type=int, default=224, help="side the tiny ViT squashes captures to")
    parser.add_argument("--backbone", help="a backbone name as musc score takes it (default: the tiny random ViT)")
    parser.add_argument("--preset", help="a musc preset (needs its weights)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--check", action="store_true", help="fail unless every capture got its outputs")
    parser.add_argument("--json", type=Path, default=None)
    add_prefect_api_option(parser)
    args = parser.parse_args()
    width, height = (int(v) for v in args.resolution.lower().split("x"))
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    with tempfile.TemporaryDirectory(prefix="musc-factory-") as tmp:
        input_dir, input_bytes = make_night(Path(tmp), args.images, width, height, seed=args.images)
        result = run_night(input_dir, Path(tmp) / "out", args)
        if args.check:
            check_outputs(Path(tmp) / "out", args.images)
    n, cores = args.images, os.cpu_count() or 1
    output_bytes = sum(result[f"bytes_{kind}"] for kind in OUTPUT_KINDS)
    print(
        f"{n} captures {width}x{height} JPEG ({input_bytes / n / 2**20:.2f} MiB each), "
        f"{args.preset or args.backbone or 'tiny random ViT'}; {cores} cores; load average before {load_before}"
    )
    print()
    print("| stage | s/image |")
    print("| --- | --- |")
    for stage in STAGES:
        print(f"| {stage} | {result[f'seconds_{stage}'] / n:.3f} |")
    print(f"| whole run (wall) | {result['seconds'] / n:.3f} |")
    print()
    print(
        f"CPU utilisation {100 * result['cpu_seconds'] / result['seconds'] / cores:.0f} % of {cores} cores; "
        f"peak RSS all processes {result['peak_tree_rss_mib']:.0f} MiB, one process "
        f"{result['peak_process_rss_mib']:.0f} MiB; flagged {result['n_flagged']}"
    )
    print()
    print("| output | MiB | of input |")
    print("| --- | --- | --- |")
    for kind in OUTPUT_KINDS:
        print(
            f"| {kind} | {result[f'bytes_{kind}'] / 2**20:.1f} | {100 * result[f'bytes_{kind}'] / input_bytes:.1f} % |"
        )
    print(f"| all outputs | {output_bytes / 2**20:.1f} | {100 * output_bytes / input_bytes:.1f} % |")
    print(f"| input | {input_bytes / 2**20:.1f} | 100 % |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"images": n, "resolution": [width, height], "input_bytes": input_bytes, **result}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
