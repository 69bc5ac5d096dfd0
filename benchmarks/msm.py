"""MSM: our tiled GEMM formulation vs per-image torch.cdist (the reference approach).

Usage: .venv/bin/python benchmarks/msm.py [--n 32] [--length 1369] [--channels 1024] [--tile T]
Prints both times, the ratio, the max abs difference, and achieved GFLOP/s vs a plain GEMM.
"""

import argparse
import time

import torch

from musc_tasks.core import auto_tile_images, mutual_scores, neighbour_count


def msm_by_cdist(tokens: torch.Tensor, interval: float = 0.3) -> torch.Tensor:
    """Per image: cdist to all other images' patches, min per image, mean of the K smallest."""
    n, length, _ = tokens.shape
    k = neighbour_count(n, interval)
    scores = torch.empty(n, length)
    for i in range(n):
        others = torch.cat([tokens[:i], tokens[i + 1 :]]).reshape(-1, tokens.shape[-1])
        distances = torch.cdist(tokens[i], others)  # (L, (N-1) L)
        per_image = distances.reshape(length, n - 1, length).amin(dim=2)  # (L, N-1)
        scores[i] = torch.topk(per_image, k, dim=1, largest=False).values.mean(dim=1)
    return scores


def gemm_rate(size: int = 4096, channels: int = 1024, repeats: int = 3) -> float:
    a, b = torch.randn(size, channels), torch.randn(channels, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size * size * channels * repeats / (time.perf_counter() - started) / 1e9


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--length", type=int, default=1369)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=None, help="images per GEMM tile")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(args.n, args.length, args.channels), dim=-1)
    tile = args.tile or auto_tile_images(args.length)

    peak = gemm_rate(channels=args.channels)
    ours, ours_seconds = timed(mutual_scores, tokens, tile=tile)
    reference, reference_seconds = timed(msm_by_cdist, tokens)
    n_tiles = -(-args.n // tile)
    executed = 0
    for a in range(n_tiles):
        for b in range(a, n_tiles):
            rows_a = min(tile, args.n - a * tile)
            rows_b = min(tile, args.n - b * tile)
            executed += 2 * rows_a * rows_b * args.length**2 * args.channels
    ours_rate = executed / ours_seconds / 1e9
    print(f"N={args.n} L={args.length} C={args.channels} tile={tile} threads={torch.get_num_threads()}")
    print(f"plain GEMM            {peak:8.1f} GFLOP/s")
    print(f"ours (tiled GEMM)     {ours_seconds:8.2f} s   {ours_rate:8.1f} GFLOP/s   {ours_rate / peak:6.1%} of GEMM")
    print(f"reference (cdist)     {reference_seconds:8.2f} s")
    print(f"speed-up              {reference_seconds / ours_seconds:8.2f} x")
    print(f"max |difference|      {(ours - reference).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
