"""MSM: mutual scoring of patches against the other images of a pool (MUSC_SPEC §4).

Tokens are unit vectors, so ``||u - v||^2 = 2 - 2 u.v`` and the nearest patch of another
image is the one with the largest inner product. One GEMM ``Z_a Z_b^T`` of two image blocks
therefore serves both directions: its row maxima score block a against block b, its column
maxima score block b against block a. Only the upper triangle of block pairs is computed.

Precision: by default the GEMM runs in the tokens' own dtype (float32 from LNAMD, so the
scores are exact up to float32 rounding). ``compute_dtype=torch.bfloat16`` (or float16)
rounds the tokens to that dtype, accumulates their products in float32, and writes the
product once, rounded to the compute dtype, as ``s - 1`` (one cuBLAS call on CUDA: addmm with
a -1 bias, added in float32 before the rounding). ``1 - s = d^2 / 2`` is what the scores
need, and storing it rather than ``s`` keeps a relative precision of u (2^-8 bf16, 2^-11 fp16)
on every squared distance, where ``s`` itself in bf16 near 1 would lose ~0.01 on small
distances. Against a float32 product the low-precision write halves the bytes of the
product the two maxima read. A CPU has no fast bf16 GEMM, so there the rounded tokens are
multiplied in float32 and the result rounded the same way: the same numbers as on CUDA up
to summation order, and no speed-up. Speeds and measured errors: docs/performance.md.
"""

import itertools

import torch
from torch import Tensor

__all__ = [
    "neighbour_count",
    "nearest_similarities",
    "scores_from_similarities",
    "mutual_scores",
    "auto_tile_images",
]


def neighbour_count(n_images: int, interval: float = 0.3) -> int:
    """Number K of smallest per-image distances averaged into a patch score.

    Parameters
    ----------
    n_images : int
        Pool size N, at least 2.
    interval : float
        Fraction of the N - 1 other images, in (0, 1].

    Returns
    -------
    k : int
        ``max(1, int(interval * (N - 1)))``. The reference formula alone gives 0 for N < 5
        (and then divides by zero); we keep at least the single nearest image.
    """
    if n_images < 2:
        raise ValueError(
            f"a pool needs at least 2 images to compare (MuSc scores an image against the "
            f"others of its pool), got n_images={n_images}"
        )
    if not 0.0 < interval <= 1.0:
        raise ValueError(f"interval must be in (0, 1], got {interval}")
    return max(1, int(interval * (n_images - 1)))


def auto_tile_images(n_patches: int, *, target_rows: int = 4096) -> int:
    """Images per GEMM tile so that a tile holds about ``target_rows`` patches.

    About 4096 rows keeps each GEMM large enough to run near the machine's peak while the
    (B*L, B*L) float32 product stays at tens of megabytes.
    """
    if n_patches < 1:
        raise ValueError(f"n_patches must be >= 1, got {n_patches}")
    return max(1, target_rows // n_patches)


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _check_compute_dtype(compute_dtype: torch.dtype | None) -> None:
    if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float64, *_LOW_PRECISION):
        raise ValueError(
            f"compute_dtype must be None, torch.float32, torch.float64, torch.bfloat16 or "
            f"torch.float16, got {compute_dtype}"
        )


def _shifted_products(rows_a: Tensor, rows_b: Tensor, dtype: torch.dtype) -> Tensor:
    """``rows_a @ rows_b.T - 1`` of two (M, C) matrices rounded to ``dtype``, accumulated in float32."""
    rows_a, rows_b = rows_a.to(dtype), rows_b.to(dtype)
    if rows_a.device.type == "cuda":
        minus_one = torch.full((rows_b.shape[0],), -1.0, dtype=dtype, device=rows_a.device)
        return torch.addmm(minus_one, rows_a, rows_b.T)  # bias added in float32, then one rounding
    return (rows_a.float() @ rows_b.float().T - 1.0).to(dtype)


def nearest_similarities(
    block_a: Tensor,
    block_b: Tensor,
    *,
    compute_dtype: torch.dtype | None = None,
    tile: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Largest inner product of every patch with each image of the other block.

    Parameters
    ----------
    block_a : (Ba, L, C) float tensor
        Unit-length tokens of Ba images.
    block_b : (Bb, L, C) float tensor
        Unit-length tokens of Bb images, same L and C. Passing ``block_a`` itself computes
        only the upper triangle of tiles (the two directions are then equal).
    compute_dtype : torch.dtype, optional
        dtype of the GEMM inputs. None: the blocks' own dtype (exact for float32 tokens).
        torch.bfloat16 or torch.float16: the tokens are rounded to it, the products are
        accumulated in float32 and kept as ``s - 1`` in that dtype (see the module notes);
        each similarity then moves by at most ``2u + u^2 + u (1 - s)`` plus the float32
        accumulation error (u = 2^-8 bf16, 2^-11 fp16). Meant for CUDA.
    tile : int, optional
        Images per GEMM tile; default `auto_tile_images`. Bounds the product held in memory
        at (tile * L)^2 values (a CPU holds a few MiB of it per thread at a time: `_tile_similarities`),
        so blocks can be as large as the caller likes. Any value gives the same result.

    Returns
    -------
    a_to_b : (Ba, L, Bb) tensor
        ``a_to_b[i, p, j] = max_q <a[i, p], b[j, q]>``; float32 for a low compute dtype,
        else the product's dtype.
    b_to_a : (Bb, L, Ba) tensor
        ``b_to_a[j, q, i] = max_p <a[i, p], b[j, q]>``, from the same products.
    """
    if block_a.ndim != 3 or block_b.ndim != 3 or block_a.shape[1:] != block_b.shape[1:]:
        raise ValueError(
            f"blocks must be (B, L, C) with equal L and C, got {tuple(block_a.shape)} and {tuple(block_b.shape)}"
        )
    _check_compute_dtype(compute_dtype)
    n_a, length, _ = block_a.shape
    n_b = block_b.shape[0]
    step = auto_tile_images(length) if tile is None else tile
    if step < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if n_a <= step and n_b <= step:
        return _tile_similarities(block_a, block_b, compute_dtype)
    same = block_b is block_a
    dtype = torch.float32 if compute_dtype in _LOW_PRECISION else (compute_dtype or block_a.dtype)
    a_to_b = torch.empty(n_a, length, n_b, dtype=dtype, device=block_a.device)
    b_to_a = a_to_b if same else torch.empty(n_b, length, n_a, dtype=dtype, device=block_a.device)
    for i in range(0, n_a, step):
        for j in range(i if same else 0, n_b, step):
            ab, ba = _tile_similarities(block_a[i : i + step], block_b[j : j + step], compute_dtype)
            a_to_b[i : i + step, :, j : j + step] = ab
            b_to_a[j : j + step, :, i : i + step] = ba
    return a_to_b, b_to_a


# On one CPU thread (each Dask worker's) a float32 tile is multiplied in strips of rows of block a,
# each strip's product about 4 MiB (a few times a core's L2, well inside L3), into one buffer reused
# for every strip: both maxima then read the product while it is in cache, where the whole tile's
# tens of megabytes were re-read from memory twice and, above glibc's mmap threshold, mapped and
# page-faulted in for every tile. On several threads the strips hold 4 MiB per thread, and only a
# tile whose whole product is over glibc's largest mmap threshold (32 MiB) is split: on 2 idle
# threads the strips took 0.40x of one GEMM's time for pools of L = 196 (a 61 MB product per tile)
# but 1.10x at L = 1369, C = 128 (30 MB), where one GEMM's product stays in the heap. MKL's float32
# GEMM gave the same entries for any row count of 16 or more (K = 128-1024, 196-2738 columns, on 1
# and 2 threads) but not always below (or against 1-3 columns), so a strip has at least 64 rows and
# a tile at least 64 columns, else the tile is one GEMM as before; its float64 GEMM's entries change
# with the row count up to about 128 rows, so float64 keeps one GEMM per tile, as CUDA does.
# Measurements: docs/performance.md (*Tiles in cache-sized strips*, *Strips on several threads*).
_STRIP_BYTES = 4 << 20
_MIN_STRIP_ROWS = 64
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def _tile_similarities(block_a: Tensor, block_b: Tensor, compute_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """`nearest_similarities` of two blocks: a float32 GEMM on a CPU in cache-sized row strips, else in one."""
    n_rows = block_a.shape[0] * block_a.shape[1]
    n_columns = block_b.shape[0] * block_b.shape[1]
    float32_gemm = compute_dtype in (*_LOW_PRECISION, torch.float32) or (
        compute_dtype is None and block_a.dtype == torch.float32
    )
    threads = torch.get_num_threads()
    budget = max(_MIN_STRIP_ROWS, _STRIP_BYTES * threads // (4 * n_columns))
    n_strips = min(-(-n_rows // budget), n_rows // _MIN_STRIP_ROWS)
    mapped = 4 * n_rows * n_columns > _MMAP_THRESHOLD_MAX  # the whole product, mapped and faulted in per tile
    splits = block_a.device.type == "cpu" and float32_gemm and n_columns >= _MIN_STRIP_ROWS and n_strips >= 2
    if not splits or (threads > 1 and not mapped):
        return _whole_tile_similarities(block_a, block_b, compute_dtype)
    return _strip_similarities(block_a, block_b, compute_dtype, n_strips=n_strips)


def _whole_tile_similarities(
    block_a: Tensor, block_b: Tensor, compute_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """`nearest_similarities` of two blocks in one GEMM."""
    n_a, length, channels = block_a.shape
    n_b = block_b.shape[0]
    rows_a = block_a.reshape(n_a * length, channels)
    rows_b = block_b.reshape(n_b * length, channels)
    if compute_dtype in _LOW_PRECISION:
        shifted = _shifted_products(rows_a, rows_b, compute_dtype).view(n_a, length, n_b, length)  # s - 1
        # rounding is monotone, so the max of the rounded values is the rounded max
        a_to_b = shifted.amax(dim=3).float() + 1.0  # (Ba, L, Bb)
        b_to_a = shifted.amax(dim=1).permute(1, 2, 0).float() + 1.0  # (Bb, L, Ba)
        return a_to_b, b_to_a
    if compute_dtype is not None:
        rows_a, rows_b = rows_a.to(compute_dtype), rows_b.to(compute_dtype)
    products = (rows_a @ rows_b.T).view(n_a, length, n_b, length)  # (Ba, L, Bb, L)
    a_to_b = products.amax(dim=3)  # (Ba, L, Bb)
    b_to_a = products.amax(dim=1).permute(1, 2, 0)  # (Bb, L, Ba)
    return a_to_b, b_to_a


def _strip_similarities(
    block_a: Tensor, block_b: Tensor, compute_dtype: torch.dtype | None, *, n_strips: int
) -> tuple[Tensor, Tensor]:
    """`_whole_tile_similarities` with block a's rows in ``n_strips`` near-equal strips (CPU).

    A strip's product is those rows of the whole tile's (where the GEMM's entries do not depend
    on its row count: see `_tile_similarities`), its row maxima are final, and an image's column
    maxima are a running maximum over the parts of strips that hold its rows, so the result is
    the whole tile's.
    """
    n_a, length, channels = block_a.shape
    n_b = block_b.shape[0]
    low = compute_dtype in _LOW_PRECISION
    if low:  # as `_shifted_products` on a CPU: the rounded tokens multiplied in float32
        block_a, block_b = block_a.to(compute_dtype).float(), block_b.to(compute_dtype).float()
    elif compute_dtype is not None:
        block_a, block_b = block_a.to(compute_dtype), block_b.to(compute_dtype)
    rows_a = block_a.reshape(n_a * length, channels)
    columns = block_b.reshape(n_b * length, channels).T  # (C, Bb L)
    kept = compute_dtype if low else block_a.dtype  # dtype of the maxima
    a_to_b = torch.empty(n_a * length, n_b, dtype=kept)
    b_to_a = torch.empty(n_a, n_b * length, dtype=kept)  # column maxima per image of a
    bounds = [s * n_a * length // n_strips for s in range(n_strips + 1)]
    product = torch.empty(-(-n_a * length // n_strips) * n_b * length, dtype=block_a.dtype)  # for every strip
    for start, stop in itertools.pairwise(bounds):
        strip = product[: (stop - start) * n_b * length].view(stop - start, n_b * length)
        torch.mm(rows_a[start:stop], columns, out=strip)
        if low:
            strip = strip.sub_(1.0).to(compute_dtype)  # s - 1, rounded once
        torch.amax(strip.view(stop - start, n_b, length), dim=2, out=a_to_b[start:stop])
        for image in range(start // length, -(-stop // length)):  # images of a with rows in the strip
            first, last = max(start, image * length), min(stop, (image + 1) * length)
            maxima = strip[first - start : last - start]
            if first == image * length:
                torch.amax(maxima, dim=0, out=b_to_a[image])
            else:
                torch.maximum(b_to_a[image], maxima.amax(dim=0), out=b_to_a[image])
    a_to_b = a_to_b.view(n_a, length, n_b)
    b_to_a = b_to_a.view(n_a, n_b, length).permute(1, 2, 0)  # (Bb, L, Ba)
    if low:
        return a_to_b.float() + 1.0, b_to_a.float() + 1.0
    return a_to_b, b_to_a


def scores_from_similarities(similarities: Tensor, own_index: Tensor, k: int) -> Tensor:
    """Patch scores from each patch's best match in every image of the pool.

    Parameters
    ----------
    similarities : (B, L, N) float tensor
        ``similarities[i, p, j]`` is the largest inner product of patch p of image i with
        any patch of pool image j (see `nearest_similarities`).
    own_index : (B,) int64 tensor
        Column of each row's own image in the pool; that column is ignored.
    k : int
        How many of the smallest distances to average (`neighbour_count`).

    Returns
    -------
    scores : (B, L) float32 tensor
        Mean of the k smallest distances ``sqrt(2 - 2 s)`` to the other images.
    """
    n_rows, _, n_pool = similarities.shape
    if own_index.shape != (n_rows,):
        raise ValueError(f"own_index must have shape ({n_rows},), got {tuple(own_index.shape)}")
    if not 1 <= k <= n_pool - 1:
        raise ValueError(f"k must be in [1, {n_pool - 1}] for a pool of {n_pool}, got {k}")
    distances = torch.sqrt(torch.clamp(2.0 - 2.0 * similarities.float(), min=0.0))
    rows = torch.arange(n_rows, device=similarities.device)
    distances[rows, :, own_index.to(similarities.device)] = torch.inf
    nearest = torch.topk(distances, k, dim=2, largest=False, sorted=False).values
    return nearest.mean(dim=2)


def mutual_scores(
    tokens: Tensor,
    *,
    interval: float = 0.3,
    tile: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Score each patch by its distance to the other images of its pool.

    Parameters
    ----------
    tokens : (N, L, C) float tensor
        LNAMD output (`aggregate_tokens`); every C-vector has unit length. N >= 2.
    interval : float
        Fraction of the other images whose distances are averaged:
        K = max(1, int(interval * (N - 1))).
    tile : int, optional
        Images per GEMM tile; default `auto_tile_images`. Any value gives the same scores.
    compute_dtype : torch.dtype, optional
        GEMM input dtype, as in `nearest_similarities`. None keeps the tokens' dtype.
        torch.bfloat16 / torch.float16 on CUDA run the GEMMs on the tensor cores with float32
        accumulation. Rounding the unit tokens moves each similarity by up to 2u + u^2
        (u = 2^-8 bf16, 2^-11 fp16), hence a distance d by about that over d; the rounded
        ``s - 1`` adds at most a relative u/2 on d (measured errors: docs/performance.md).

    Returns
    -------
    scores : (N, L) float32 tensor
        Higher is more anomalous.

    Notes
    -----
    Holds the (N, L, N) similarity table, 4 N^2 L bytes, plus one (B L, B L) product: the
    pool is one block against itself, so only the upper triangle of tiles is multiplied.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (N, L, C), got shape {tuple(tokens.shape)}")
    n_images = tokens.shape[0]
    k = neighbour_count(n_images, interval)
    _check_compute_dtype(compute_dtype)
    if compute_dtype is not None:
        tokens = tokens.to(compute_dtype)  # round once, not once per tile
    similarities, _ = nearest_similarities(tokens, tokens, compute_dtype=compute_dtype, tile=tile)
    return scores_from_similarities(similarities, torch.arange(n_images, device=tokens.device), k)
