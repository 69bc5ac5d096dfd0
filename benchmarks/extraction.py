"""Extraction against the bare forward pass on the same images, as one ratio measured in one run.

Usage (from the repository root):
    .venv/bin/python benchmarks/extraction.py [--images 32] [--resolution 2448x2048] [--repeats 3] [--json out.json]
    .venv/bin/python benchmarks/extraction.py --backbone ViT-B-16 --image-size 224 --layers 5,11   # random weights

It writes N synthetic JPEG captures (`factory_night.make_night`), decodes them once to keep
their pixels, then, per repeat and on the same backbone in this process: the bare forward
pass over those already-decoded blocks of 8 images (`Backbone.extract`), the extraction into
a fresh token store decoding one image after the other (``decode_threads=0``: the code before
decoding overlapped the model) and the extraction as the pipeline runs it now (the next block
decoded in threads while the model runs). It prints the median seconds, each extraction's
ratio to the bare forward pass, the decoding alone, and the load average before and after
(the machine is shared: read the ratios, not the seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from day_scale import TINY_CONFIG  # noqa: E402
from factory_night import make_night  # noqa: E402

from musc_tasks.backbone import load_backbone  # noqa: E402
from musc_tasks.config import BackboneSpec  # noqa: E402
from musc_tasks.extract import extract_tokens_to_store  # noqa: E402
from musc_tasks.loading import decode_threads, load_blocks  # noqa: E402

BLOCK_IMAGES = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--resolution", default="2448x2048", help="WIDTHxHEIGHT of the captures")
    parser.add_argument("--backbone", default="musc-tiny-vit", help="open_clip name; random weights")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", default="1,3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (outputs return to the CPU: timed whole)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    width, height = (int(v) for v in args.resolution.lower().split("x"))
    load_before = os.getloadavg()
    config = TINY_CONFIG if args.backbone == "musc-tiny-vit" else None
    spec = BackboneSpec(
        name=args.backbone,
        pretrained=None,
        image_size=args.image_size,
        layers=tuple(int(v) for v in args.layers.split(",")),
        model_config_path=config,
    )
    backbone = load_backbone(spec, device=args.device)
    with tempfile.TemporaryDirectory(prefix="musc-extraction-") as tmp:
        root = Path(tmp)
        input_dir, input_bytes = make_night(root, args.images, width, height, seed=0)
        images = [(path.stem, str(path)) for path in sorted(input_dir.rglob("*.jpg"))]
        batches = [images[i : i + BLOCK_IMAGES] for i in range(0, len(images), BLOCK_IMAGES)]
        started = time.perf_counter()
        decoded = [block.pixels for block in load_blocks(batches, backbone.preprocess, threads=0)]
        decode_seconds = time.perf_counter() - started

        def forward() -> None:
            with torch.inference_mode():
                for pixels in decoded:
                    backbone.extract(pixels)

        def extraction(threads: int | None) -> Callable:
            def run() -> None:
                store = root / f"tokens-{time.monotonic_ns()}.zarr"
                done = extract_tokens_to_store(
                    store, images, lambda: backbone, shard_images=BLOCK_IMAGES, decode_threads=threads
                )
                assert done.extracted == len(images), done

            return run

        cases = {"forward": forward, "serial": extraction(0), "overlapped": extraction(None)}
        forward()  # warm-up: first-call allocations
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, case in cases.items():
                started = time.perf_counter()
                case()
                seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "images": args.images,
        "resolution": args.resolution,
        "input_mib": round(input_bytes / 2**20, 1),
        "device": str(backbone.device),
        "torch_threads": torch.get_num_threads(),
        "decode_threads": decode_threads(),
        "decode_s_per_image": round(decode_seconds / args.images, 4),
        **{f"{name}_s": [round(v, 3) for v in values] for name, values in seconds.items()},
        "serial_over_forward": round(median["serial"] / median["forward"], 2),
        "overlapped_over_forward": round(median["overlapped"] / median["forward"], 2),
        "overlapped_over_serial": round(median["overlapped"] / median["serial"], 2),
        "load_before": [round(v, 1) for v in load_before],
        "load_after": [round(v, 1) for v in os.getloadavg()],
    }
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
