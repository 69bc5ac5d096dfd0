"""RsCIN: re-score images with their most similar neighbours (MUSC_SPEC §6)."""

from collections.abc import Sequence

import numpy as np

__all__ = ["rescore_images"]


def rescore_images(scores: np.ndarray, embeddings: np.ndarray, k_list: Sequence[int]) -> np.ndarray:
    """Smooth raw image scores over each image's k most similar images.

    Parameters
    ----------
    scores : (N,) float array
        Raw image scores (max of each image's anomaly map) of every image being re-scored.
    embeddings : (N, D) float array
        Image-level tokens as the backbone gives them, in the same order: L2-normalised for
        CLIP (MUSC_SPEC §2), raw final-norm class tokens for DINO (§8), used as they are.
    k_list : sequence of int
        Window sizes; k = 1 keeps only the image itself. Each k is clipped to N.

    Returns
    -------
    rescored : (N,) float64 array
        Mean over k of ``P_k c``, where c is the min-max normalised scores and P_k keeps the
        k largest entries of each row of ``W = T T^T``, divided by their row sum.

    Notes
    -----
    Ties in a row of W are broken in favour of the image itself, then the lower index, so
    the result does not depend on sort internals (duplicates of an image tie with it).
    If all raw scores are equal, c is all zeros.
    """
    scores = np.asarray(scores, dtype=np.float64)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if scores.ndim != 1 or embeddings.ndim != 2 or len(scores) != len(embeddings):
        raise ValueError(f"scores must be (N,) and embeddings (N, D), got {scores.shape} and {embeddings.shape}")
    if len(scores) == 0:
        raise ValueError("scores is empty: nothing to re-score")
    if not k_list or any(int(k) < 1 for k in k_list):
        raise ValueError(f"k_list must hold integers >= 1, got {list(k_list)}")
    n = len(scores)
    span = scores.max() - scores.min()
    normalised = (scores - scores.min()) / span if span > 0 else np.zeros(n)
    similarity = embeddings @ embeddings.T  # (N, N)
    columns = np.arange(n)
    not_self = columns[None, :] != columns[:, None]
    # lexsort: last key is primary -> descending similarity, then self first, then index
    order = np.stack(
        [np.lexsort((columns, not_self[i], -similarity[i])) for i in range(n)]
    )  # (N, N) column order per row
    rescored = np.zeros(n)
    for k in k_list:
        keep = order[:, : min(int(k), n)]  # (N, k)
        weights = np.take_along_axis(similarity, keep, axis=1)
        weights = weights / weights.sum(axis=1, keepdims=True)
        rescored += (weights * normalised[keep]).sum(axis=1)
    return rescored / len(k_list)
