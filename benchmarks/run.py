"""Stage timings of MuSc on synthetic inputs of the real shapes, with the machine's own ceilings.

Usage (from the repository root):
    .venv/bin/python benchmarks/run.py --smoke                       # tiny shapes, seconds (CI)
    .venv/bin/python benchmarks/run.py --shapes vit-l vit-b --n 32 64 [--json out.json]
    python3 benchmarks/run.py --device cuda --n 32 64 200 --pool-images 200

Measures, per backbone shape: extraction images/s (random-init open_clip ViT), LNAMD ms/image,
RsCIN ms, MSM seconds and GFLOP/s for each pool size N next to the reference per-image cdist
formulation on the same tokens (max |difference| and time ratio), and the plain GEMM rate of
the same machine in the same run; on CUDA also the bf16/fp16 GEMM rate, MSM with
compute_dtype=bf16/fp16 at several block sizes, and one whole pool (extraction + LNAMD + MSM
of every layer and r) per image against the paper's 998.8 ms/image. Ratios (ours/reference,
ours/GEMM) carry across machines; absolute times do not. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from msm import gemm_rate, msm_by_cdist  # benchmarks/msm.py, beside this script

from musc_tasks.backbone import load_backbone
from musc_tasks.config import BackboneSpec
from musc_tasks.core import aggregate_tokens, auto_tile_images, mutual_scores, pool_patch_scores, rescore_images

PAPER_MS_PER_IMAGE = 998.8  # MuSc paper, ViT-L-14-336 at 518 px, per image of a 200-image pool
R_LIST = (1, 3, 5)
RSCIN_K = (1, 2, 3)
TINY_CONFIG = Path(__file__).resolve().parents[1] / "musc_tasks" / "model_configs" / "musc-tiny-vit.json"


@dataclass(frozen=True)
class Shape:
    """A backbone (random weights: only shapes are timed) and the sizes it gives."""

    key: str
    backbone: BackboneSpec
    length: int  # L = (image_size / patch)^2
    channels: int  # C, the ViT width
    embed_dim: int  # D, for RsCIN


def _random(name: str, image_size: int, layers: tuple[int, ...], model_config: Path | None = None) -> BackboneSpec:
    return BackboneSpec(
        name=name, pretrained=None, image_size=image_size, layers=layers, model_config_path=model_config
    )


SHAPES = {
    "vit-l": Shape("vit-l", _random("ViT-L-14-336", 518, (5, 11, 17, 23)), 1369, 1024, 768),
    "vit-b": Shape("vit-b", _random("ViT-B-16-plus-240", 512, (2, 5, 8, 11)), 1024, 896, 640),
    "tiny": Shape("tiny", _random("musc-tiny-vit", 224, (1, 3), TINY_CONFIG), 256, 64, 32),
}


# -- timing helpers ---------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kwargs):
    """(result, seconds) of one call, with the device's queue drained on both sides."""
    synchronize(device)
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    return out, time.perf_counter() - started


def msm_flops(n: int, length: int, channels: int, block: int) -> int:
    """Multiply-adds x 2 of the GEMMs `mutual_scores` runs (upper triangle of block pairs)."""
    starts = range(0, n, block)
    return sum(
        2 * min(block, n - a) * min(block, n - b) * length * length * channels for a in starts for b in starts if b >= a
    )


def cuda_gemm_rate(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 20) -> float:
    """FLOP/s of one (m, k) x (k, n) product on random data, CUDA events, median of repeats."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * m * k * n / float(np.median(times))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def unit_tokens(n: int, length: int, channels: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, length, channels, generator=generator)
    return torch.nn.functional.normalize(tokens, dim=-1).to(device)


# -- stages -----------------------------------------------------------------------------


def bench_extraction(shape: Shape, device: torch.device, n_images: int, batch: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RANDOM weights": intended here
        backbone = load_backbone(shape.backbone, device=str(device))
    images = torch.randn(batch, 3, shape.backbone.image_size, shape.backbone.image_size)
    backbone.extract(images[:1])  # warm-up: kernels, cuBLAS handles
    done, seconds = 0, 0.0
    while done < n_images:
        count = min(batch, n_images - done)
        _, took = timed(device, backbone.extract, images[:count])
        done, seconds = done + count, seconds + took
    out = {"extract_images": done, "extract_seconds": seconds, "extract_images_per_s": done / seconds}
    if device.type == "cuda":
        # The same forward without the copy of the tokens to the host that `extract` makes.
        on_device = images.to(device)
        forward = backbone.visual.forward_intermediates
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            forward(on_device[:1], indices=list(shape.backbone.layers), output_fmt="NLC")
            _, took = timed(device, forward, on_device, indices=list(shape.backbone.layers), output_fmt="NLC")
        out["forward_only_images_per_s"] = batch / took
    out["backbone"] = backbone
    return out


def bench_lnamd(shape: Shape, device: torch.device, n_images: int) -> dict:
    """Ms per image for every r of one layer, times the number of layers."""
    side = int(round(shape.length**0.5))
    raw = torch.randn(n_images, shape.length, shape.channels, generator=torch.Generator().manual_seed(1)).to(device)
    for r in R_LIST:
        aggregate_tokens(raw[:1], (side, side), r)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for r in R_LIST:
        aggregate_tokens(raw, (side, side), r)
    synchronize(device)
    per_layer = (time.perf_counter() - started) / n_images
    return {"lnamd_ms_per_image": per_layer * len(shape.backbone.layers) * 1e3, "lnamd_images": n_images}


def bench_rscin(shape: Shape, n: int) -> dict:
    generator = np.random.default_rng(2)
    embeddings = generator.standard_normal((n, shape.embed_dim))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = generator.random(n)
    started = time.perf_counter()
    rescore_images(scores, embeddings, RSCIN_K)
    return {"rscin_n": n, "rscin_ms": (time.perf_counter() - started) * 1e3}


def bench_msm(
    shape: Shape,
    n: int,
    device: torch.device,
    *,
    block: int | None,
    gemm_peak: float,
    reference_max_n: int,
    low_blocks: tuple[int, ...],
    low_peak: float | None,
) -> dict:
    tokens = unit_tokens(n, shape.length, shape.channels, device, seed=n)
    step = block or auto_tile_images(shape.length)
    mutual_scores(tokens[:2], tile=step)  # warm-up
    ours, seconds = timed(device, mutual_scores, tokens, tile=step)
    rate = msm_flops(n, shape.length, shape.channels, step) / seconds
    row = {
        "shape": shape.key,
        "n": n,
        "block": step,
        "msm_seconds": seconds,
        "msm_gflops": rate / 1e9,
        "msm_of_gemm": rate / gemm_peak,
    }
    if n <= reference_max_n:
        reference, reference_seconds = timed(device, msm_by_cdist, tokens)
        row["reference_seconds"] = reference_seconds
        row["speedup_vs_reference"] = reference_seconds / seconds
        row["max_abs_diff"] = (ours.cpu() - reference.cpu()).abs().max().item()
        del reference
    if device.type == "cuda":
        for dtype in (torch.bfloat16, torch.float16):
            name = "bf16" if dtype is torch.bfloat16 else "fp16"
            best = None
            for low_block in low_blocks:
                mutual_scores(tokens[:2], tile=low_block, compute_dtype=dtype)
                low, low_seconds = timed(device, mutual_scores, tokens, tile=low_block, compute_dtype=dtype)
                row[f"{name}_seconds_block{low_block}"] = low_seconds
                if best is None or low_seconds < best[1]:
                    best = (low_block, low_seconds, (low - ours).abs().max().item())
                del low
            low_rate = msm_flops(n, shape.length, shape.channels, best[0]) / best[1]
            row.update(
                {
                    f"{name}_block": best[0],
                    f"{name}_seconds": best[1],
                    f"{name}_tflops": low_rate / 1e12,
                    f"{name}_of_gemm": low_rate / low_peak,
                    f"{name}_max_abs_diff_vs_fp32": best[2],
                    f"{name}_speedup_vs_fp32": seconds / best[1],
                }
            )
    del tokens, ours
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_pool(
    shape: Shape, backbone, device: torch.device, n: int, batch: int, block: int, dtype: torch.dtype
) -> dict:
    """One whole pool: extract n images, then LNAMD + MSM of every layer and r, on the device.

    Timed twice: through `Backbone.extract`, which hands the tokens to the host as the
    pipeline's token store needs (and then back to the device), and with the ViT's output
    kept on the device (the same forward call and autocast as `extract`, without the copies).
    """
    side = int(round(shape.length**0.5))
    images = torch.randn(batch, 3, shape.backbone.image_size, shape.backbone.image_size)
    out = {"pool_n": n, "pool_block": block, "pool_dtype": str(dtype).removeprefix("torch.")}

    def score(layer_tokens):
        return pool_patch_scores(layer_tokens, (side, side), R_LIST, tile=block, compute_dtype=dtype)

    # 1. through Backbone.extract: device -> host -> device
    synchronize(device)
    started = time.perf_counter()
    per_layer: list[list[torch.Tensor]] = [[] for _ in shape.backbone.layers]
    for done in range(0, n, batch):
        layer_tokens, _ = backbone.extract(images[: min(batch, n - done)])
        for bucket, tokens in zip(per_layer, layer_tokens):
            bucket.append(tokens)
    synchronize(device)
    extract_seconds = time.perf_counter() - started
    layer_tokens, upload_seconds = timed(device, lambda buckets: [torch.cat(b).to(device) for b in buckets], per_layer)
    scores, score_seconds = timed(device, score, layer_tokens)
    assert scores.shape == (n, shape.length) and torch.isfinite(scores).all()
    del per_layer, layer_tokens, scores
    total = extract_seconds + upload_seconds + score_seconds
    out.update(
        {
            "pool_extract_seconds": extract_seconds,
            "pool_upload_seconds": upload_seconds,
            "pool_score_seconds": score_seconds,
            "pool_ms_per_image": total / n * 1e3,
            "pool_speedup_vs_paper": PAPER_MS_PER_IMAGE / (total / n * 1e3),
        }
    )

    # 2. tokens stay on the device
    on_device = images.to(device)

    def forward_all():
        per_layer = [[] for _ in shape.backbone.layers]
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for done in range(0, n, batch):
                result = backbone.visual.forward_intermediates(
                    on_device[: min(batch, n - done)], indices=list(shape.backbone.layers), output_fmt="NLC"
                )
                for bucket, tokens in zip(per_layer, result["image_intermediates"]):
                    bucket.append(tokens.float())
        return [torch.cat(bucket) for bucket in per_layer]

    layer_tokens, forward_seconds = timed(device, forward_all)
    scores, score_seconds = timed(device, score, layer_tokens)
    assert torch.isfinite(scores).all()
    total = forward_seconds + score_seconds
    out.update(
        {
            "device_pool_forward_seconds": forward_seconds,
            "device_pool_score_seconds": score_seconds,
            "device_pool_ms_per_image": total / n * 1e3,
            "device_pool_speedup_vs_paper": PAPER_MS_PER_IMAGE / (total / n * 1e3),
        }
    )
    return out


# -- report -----------------------------------------------------------------------------


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"device: {machine['device']}; torch {machine['torch']}; threads {machine['threads']}; "
        f"load average before {machine['load_before']}",
        "",
        "| machine ceiling | value |",
        "| --- | --- |",
        f"| plain fp32 GEMM | {machine['fp32_gemm_gflops']:.1f} GFLOP/s |",
    ]
    if "bf16_gemm_tflops" in machine:
        lines.append(f"| bf16 GEMM (8192^3) | {machine['bf16_gemm_tflops']:.0f} TFLOP/s |")
        lines.append(f"| bf16 GEMM at the MSM shape | {machine['bf16_gemm_msm_shape_tflops']:.0f} TFLOP/s |")
    lines += ["", "| shape | extract img/s | LNAMD ms/img | RsCIN ms (N) |", "| --- | --- | --- | --- |"]
    for stage in results["stages"]:
        extract = f"{stage['extract_images_per_s']:.2f} ({stage['extract_images']} img)"
        if "forward_only_images_per_s" in stage:
            extract += f"; forward only {stage['forward_only_images_per_s']:.0f}"
        lines.append(
            f"| {stage['shape']} | {extract} | {stage['lnamd_ms_per_image']:.1f} | "
            f"{stage['rscin_ms']:.1f} ({stage['rscin_n']}) |"
        )
    lines += [
        "",
        "| shape | N | block | MSM s | GFLOP/s | of fp32 GEMM | cdist s | ours/ref speed-up | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["msm"]:
        ref = (
            f"{row['reference_seconds']:.2f} | {row['speedup_vs_reference']:.2f}x | {row['max_abs_diff']:.1e}"
            if "reference_seconds" in row
            else "- | - | -"
        )
        lines.append(
            f"| {row['shape']} | {row['n']} | {row['block']} | {row['msm_seconds']:.3f} | {row['msm_gflops']:.0f} | "
            f"{row['msm_of_gemm']:.0%} | {ref} |"
        )
    if any("bf16_seconds" in row for row in results["msm"]):
        lines += [
            "",
            "| shape | N | dtype | best block | MSM s | TFLOP/s | of bf16 GEMM | vs fp32 MSM | max abs diff vs fp32 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in results["msm"]:
            for name in ("bf16", "fp16"):
                lines.append(
                    f"| {row['shape']} | {row['n']} | {name} | {row[f'{name}_block']} | {row[f'{name}_seconds']:.3f} | "
                    f"{row[f'{name}_tflops']:.0f} | {row[f'{name}_of_gemm']:.0%} | "
                    f"{row[f'{name}_speedup_vs_fp32']:.1f}x | {row[f'{name}_max_abs_diff_vs_fp32']:.1e} |"
                )
    for pool in results.get("pools", []):
        lines += [
            "",
            f"whole pool ({pool['shape']}, N={pool['pool_n']}, {pool['pool_dtype']} MSM, block {pool['pool_block']}), "
            f"paper: {PAPER_MS_PER_IMAGE} ms/image",
            "",
            "| path | extraction s | host->device s | LNAMD + MSM s | ms/image | below paper |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| Backbone.extract (tokens via host) | {pool['pool_extract_seconds']:.2f} | "
            f"{pool['pool_upload_seconds']:.2f} | {pool['pool_score_seconds']:.2f} | "
            f"{pool['pool_ms_per_image']:.1f} | {pool['pool_speedup_vs_paper']:.0f}x |",
            f"| tokens kept on the device | {pool['device_pool_forward_seconds']:.2f} | - | "
            f"{pool['device_pool_score_seconds']:.2f} | {pool['device_pool_ms_per_image']:.1f} | "
            f"{pool['device_pool_speedup_vs_paper']:.0f}x |",
        ]
    lines += ["", f"peak resident memory: {results['peak_rss_mib']:.0f} MiB"]
    if "peak_cuda_mib" in results:
        lines[-1] += f"; peak CUDA memory allocated: {results['peak_cuda_mib']:.0f} MiB"
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES), help="default: vit-l vit-b")
    parser.add_argument(
        "--n", nargs="+", type=int, default=None, help="pool sizes; default 32 64 (CPU), 32 64 200 (CUDA)"
    )
    parser.add_argument(
        "--block", type=int, default=None, help="images per GEMM tile (fp32 MSM); default auto_tile_images"
    )
    parser.add_argument(
        "--low-blocks", nargs="+", type=int, default=[2, 4, 8, 16], help="CUDA: blocks tried for bf16/fp16"
    )
    parser.add_argument("--reference-max-n", type=int, default=None, help="run the cdist reference up to this N")
    parser.add_argument("--extract-images", type=int, default=None, help="images timed through the ViT")
    parser.add_argument("--extract-batch", type=int, default=None)
    parser.add_argument("--pool-images", type=int, default=0, help="CUDA: time a whole pool of this many images")
    parser.add_argument("--smoke", action="store_true", help="tiny ViT and shapes, a few seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cuda = device.type == "cuda"
    if args.smoke:
        shapes, sizes = [SHAPES["tiny"]], args.n or [6, 12]
        extract_images, reference_max_n, gemm_size = 2, 64, 512
    else:
        shapes = [SHAPES[k] for k in (args.shapes or ["vit-l", "vit-b"])]
        sizes = args.n or ([32, 64, 200] if cuda else [32, 64])
        extract_images = args.extract_images or (64 if cuda else 2)
        reference_max_n = args.reference_max_n if args.reference_max_n is not None else (200 if cuda else 64)
        gemm_size = 4096
    batch = args.extract_batch or (32 if cuda else 1)
    torch.manual_seed(0)

    load_before = " ".join(f"{x:.2f}" for x in __import__("os").getloadavg())
    machine = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": load_before,
    }
    if cuda:
        machine["fp32_gemm_gflops"] = cuda_gemm_rate(device, torch.float32, 8192, 8192, 8192) / 1e9
        machine["bf16_gemm_tflops"] = cuda_gemm_rate(device, torch.bfloat16, 8192, 8192, 8192) / 1e12
        rows = 8 * shapes[0].length
        machine["bf16_gemm_msm_shape_tflops"] = (
            cuda_gemm_rate(device, torch.bfloat16, rows, shapes[0].channels, rows) / 1e12
        )
    else:
        machine["fp32_gemm_gflops"] = gemm_rate(size=gemm_size, channels=shapes[0].channels)
    results: dict = {"machine": machine, "stages": [], "msm": [], "pools": []}

    for shape in shapes:
        extraction = bench_extraction(shape, device, extract_images, batch)
        backbone = extraction.pop("backbone")
        stage = {"shape": shape.key, **extraction}
        stage.update(bench_lnamd(shape, device, min(64 if cuda else 8, max(sizes))))
        stage.update(bench_rscin(shape, max(sizes)))
        results["stages"].append(stage)
        for n in sizes:
            results["msm"].append(
                bench_msm(
                    shape,
                    n,
                    device,
                    block=args.block,
                    gemm_peak=machine["fp32_gemm_gflops"] * 1e9,
                    reference_max_n=reference_max_n,
                    low_blocks=tuple(args.low_blocks),
                    low_peak=machine.get("bf16_gemm_tflops", 0) * 1e12,
                )
            )
        if args.pool_images and (shape.key == "vit-l" or args.smoke):
            largest = max((r for r in results["msm"] if r["shape"] == shape.key), key=lambda r: r["n"])
            # the fastest bf16 block at the largest N measured; bf16 is only emulated off CUDA
            best = largest["bf16_block"] if cuda else largest["block"]
            pool = bench_pool(shape, backbone, device, args.pool_images, batch, best, torch.bfloat16)
            results["pools"].append({"shape": shape.key, **pool})
        del backbone
        if cuda:
            torch.cuda.empty_cache()
    results["peak_rss_mib"] = peak_rss_mib()
    if cuda:
        results["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
