"""MSM: mutual scoring of patches against the other images of a pool (MUSC_SPEC §4).

Tokens are unit vectors, so ``||u - v||^2 = 2 - 2 u.v`` and the nearest patch of another
image is the one with the largest inner product. One GEMM ``Z_a Z_b^T`` of two image blocks
therefore serves both directions: its row maxima score block a against block b, its column
maxima score block b against block a. Only the upper triangle of block pairs is computed.
"""

import torch
from torch import Tensor

__all__ = [
    "neighbour_count",
    "nearest_similarities",
    "scores_from_similarities",
    "mutual_scores",
    "auto_block_size",
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


def auto_block_size(n_patches: int, *, target_rows: int = 4096) -> int:
    """Images per block so that a block holds about ``target_rows`` patches.

    About 4096 rows keeps each GEMM large enough to run near the machine's peak while the
    (B*L, B*L) float32 product stays at tens of megabytes.
    """
    if n_patches < 1:
        raise ValueError(f"n_patches must be >= 1, got {n_patches}")
    return max(1, target_rows // n_patches)


def nearest_similarities(block_a: Tensor, block_b: Tensor) -> tuple[Tensor, Tensor]:
    """Largest inner product of every patch with each image of the other block.

    Parameters
    ----------
    block_a : (Ba, L, C) float tensor
        Unit-length tokens of Ba images.
    block_b : (Bb, L, C) float tensor
        Unit-length tokens of Bb images, same L and C.

    Returns
    -------
    a_to_b : (Ba, L, Bb) tensor
        ``a_to_b[i, p, j] = max_q <a[i, p], b[j, q]>``.
    b_to_a : (Bb, L, Ba) tensor
        ``b_to_a[j, q, i] = max_p <a[i, p], b[j, q]>``, from the same product.
    """
    if block_a.ndim != 3 or block_b.ndim != 3 or block_a.shape[1:] != block_b.shape[1:]:
        raise ValueError(
            f"blocks must be (B, L, C) with equal L and C, got {tuple(block_a.shape)} "
            f"and {tuple(block_b.shape)}"
        )
    n_a, length, channels = block_a.shape
    n_b = block_b.shape[0]
    products = block_a.reshape(n_a * length, channels) @ block_b.reshape(n_b * length, channels).T
    products = products.view(n_a, length, n_b, length)  # (Ba, L, Bb, L)
    a_to_b = products.amax(dim=3)  # (Ba, L, Bb)
    b_to_a = products.amax(dim=1).permute(1, 2, 0)  # (Bb, L, Ba)
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


def mutual_scores(tokens: Tensor, *, interval: float = 0.3, block: int | None = None) -> Tensor:
    """Score each patch by its distance to the other images of its pool.

    Parameters
    ----------
    tokens : (N, L, C) float tensor
        LNAMD output (`aggregate_tokens`); every C-vector has unit length. N >= 2.
    interval : float
        Fraction of the other images whose distances are averaged:
        K = max(1, int(interval * (N - 1))).
    block : int, optional
        Images per GEMM block; default `auto_block_size`. Any value gives the same scores.

    Returns
    -------
    scores : (N, L) float32 tensor
        Higher is more anomalous.

    Notes
    -----
    Holds the (N, L, N) similarity table, 4 N^2 L bytes, plus one (B L, B L) product.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (N, L, C), got shape {tuple(tokens.shape)}")
    n_images, length, _ = tokens.shape
    k = neighbour_count(n_images, interval)
    step = block or auto_block_size(length)
    if step < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    similarities = torch.empty(n_images, length, n_images, dtype=torch.float32, device=tokens.device)
    for a in range(0, n_images, step):
        for b in range(a, n_images, step):
            a_to_b, b_to_a = nearest_similarities(tokens[a : a + step], tokens[b : b + step])
            similarities[a : a + step, :, b : b + step] = a_to_b
            if b != a:
                similarities[b : b + step, :, a : a + step] = b_to_a
    own_index = torch.arange(n_images, device=tokens.device)
    return scores_from_similarities(similarities, own_index, k)
