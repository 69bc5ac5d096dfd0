"""Splitting a product's images into disjoint scoring pools (MUSC_SPEC §4, pool splitting)."""

import math
import random
from collections.abc import Sequence

__all__ = ["split_pool", "split_by_type"]


def split_pool(n_images: int, pool_size: int, *, seed: int = 42) -> list[list[int]]:
    """Deterministic, seeded split of ``range(n_images)`` into balanced disjoint pools.

    Parameters
    ----------
    n_images : int
        Images of one product, in a fixed order (the caller sorts them, e.g. by content hash).
    pool_size : int
        Largest pool allowed, >= 2.
    seed : int
        Seed of the shuffle; the same inputs always give the same pools.

    Returns
    -------
    pools : list of sorted lists of int
        ``ceil(n_images / pool_size)`` pools whose sizes differ by at most one, so no pool
        is left with a lone image. A single pool holds every index in order.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if pool_size < 2:
        raise ValueError(f"pool_size must be >= 2, got {pool_size}")
    if n_images <= pool_size:
        return [list(range(n_images))]
    n_pools = math.ceil(n_images / pool_size)
    order = list(range(n_images))
    random.Random(seed).shuffle(order)
    return [sorted(order[t::n_pools]) for t in range(n_pools)]


def split_by_type(types: Sequence[str], divide_num: int, *, seed: int = 42) -> list[list[int]]:
    """The paper's evaluation split into ``divide_num`` subsets, stratified by defect type.

    Parameters
    ----------
    types : sequence of str
        Defect-type folder of each image; images are assumed sorted by (type, file name).
    divide_num : int
        Number of subsets D >= 1.
    seed : int
        One ``random.Random(seed)`` shuffles each type group in turn, in sorted type order.

    Returns
    -------
    subsets : list of lists of int
        Subset t takes element t of every consecutive chunk of D images of each shuffled
        group, group by group. Empty subsets are dropped.
    """
    if divide_num < 1:
        raise ValueError(f"divide_num must be >= 1, got {divide_num}")
    rng = random.Random(seed)
    subsets: list[list[int]] = [[] for _ in range(divide_num)]
    for kind in sorted(set(types)):
        group = [i for i, t in enumerate(types) if t == kind]
        rng.shuffle(group)
        for t in range(divide_num):
            subsets[t].extend(group[t::divide_num])
    return [s for s in subsets if s]
