"""Stage 2b: the night's pools scored with a known-good reference set (few-shot, plus, combined).

For each zero-shot pool of a product, the pool's images and the set's references form one
*union pool* whose block pairs run as the same Dask tasks as any pool (`scoring`), content
addressed, cached and resumable. Its similarity table holds every product the modes need:
night x night and night x reference (few-shot, whose row tasks use K over N - 1 + M scorers),
night x reference (MuSc+), reference x night (a reference's zero-shot score tonight) and
reference x reference (MuSc+ leave-one-out). One task per union pool then derives, block by
block so memory stays bounded, the patch scores of every mode into a *reference store*: a
pool-like store holding only the night's images, whose ``patch_scores`` are the chosen mode's,
so RsCIN and publishing read it exactly like a pool store. The union pool's scratch table is
dropped once the reference store is complete.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import disk_space_for
from .cluster import dask_client
from .config import CODE_VERSION, ScoringParams
from .core import (
    check_references,
    combined_scores,
    leave_one_out_distances,
    nearest_reference_distances,
    neighbour_count,
    reference_scale,
    scores_from_similarities,
)
from .identity import array_digest, params_key
from .manifests import PoolsRef
from .references import ReferenceSet
from .scoring import PoolJob, locked_pools, open_pool, plan_pool, score_pools_with_dask
from .store import (
    PoolLayout,
    create_pool_store,
    finish_pool_store,
    mark_done,
    open_pool_store,
    pool_is_complete,
    pool_layout,
    pool_store_intact,
    token_index,
    write_pool_array,
)

logger = logging.getLogger(__name__)

__all__ = ["ReferenceJob", "score_with_references"]

_NIGHT_BLOCK = 16  # night images per read of the union table: bounds memory at 16 x L x (N + M) per map
# Part of a reference store's key: bump when what the store holds changes, so older stores miss.
REFERENCE_STORE_FORMAT = 2  # 2: the references' own zero-shot and leave-one-out MuSc+ maps


@dataclass(frozen=True)
class ReferenceJob:
    """One zero-shot pool with a reference set: its union pool and the store of its mode scores."""

    zero_shot_path: str
    union: PoolJob
    n_night: int
    store_path: str
    mode: str
    reference_label: str


def score_with_references(
    pools: Sequence[PoolsRef],
    sets: dict[str, ReferenceSet],
    mode: str,
    scoring: ScoringParams,
    backbone_key: str,
    *,
    dask_address: str | None = None,
    device: str = "auto",
    on_progress=None,
    log: logging.Logger = logger,
) -> tuple[PoolsRef, ...]:
    """Stage 2b: every product with a reference set gets reference stores in place of its pools.

    Products without a set keep their zero-shot pools (and say so in the log).
    """
    jobs: list[ReferenceJob] = []
    out = []
    for ref in pools:
        stored = sets.get(ref.product)
        if stored is None:
            log.warning("%s: no reference set; scored zero-shot", ref.product)
            out.append(ref)
            continue
        check_references(len(stored.entries), mode)
        if Path(stored.token_store) != Path(ref.tokens.store_path):
            raise ValueError(f"reference set {stored.label} lives in another token store than {ref.tokens.store_path}")
        index = token_index(Path(stored.token_store))
        reference_rows = [index[e.image_id] for e in stored.entries]
        reference_ids = [f"reference:{e.image_id}" for e in stored.entries]
        paths = []
        for zero_shot_path in ref.pool_paths:
            night = pool_layout(Path(zero_shot_path))
            rows = dict(zip(ref.tokens.image_ids, ref.tokens.token_rows))
            union = plan_pool(
                Path(zero_shot_path).parent,
                (*night.image_ids, *reference_ids),
                ref.tokens.store_path,
                [rows[i] for i in night.image_ids] + reference_rows,
                grid=ref.tokens.geometry.grid,
                n_layers=ref.tokens.geometry.n_layers,
                msm=scoring.msm,
                backbone_key=backbone_key,
                task_images=scoring.task_images,
                device=device,
            )
            key = params_key(
                {
                    "pool": Path(zero_shot_path).name,
                    "refs": stored.content_key,
                    "mode": mode,
                    "code": CODE_VERSION,
                    "format": REFERENCE_STORE_FORMAT,
                },
                length=20,
            )
            store = str(Path(zero_shot_path).parent / f"refs-{key}.zarr")
            jobs.append(ReferenceJob(zero_shot_path, union, len(night.image_ids), store, mode, stored.label))
            paths.append(store)
        out.append(ref.model_copy(update={"pool_paths": tuple(paths), "reference_set": stored.label}))
    _run(jobs, dask_address, on_progress, log)
    return tuple(out)


def _run(jobs: list[ReferenceJob], dask_address: str | None, on_progress, log: logging.Logger) -> None:
    todo = [
        job for job in jobs if not (pool_is_complete(Path(job.store_path)) and pool_store_intact(Path(job.store_path)))
    ]
    if not todo:
        return
    with locked_pools([job.union for job in todo]):
        for job in todo:
            if pool_is_complete(Path(job.union.pool_path)):  # its scratch table is gone: compute it again
                shutil.rmtree(job.union.pool_path)
            open_pool(job.union, log)
        with dask_client(dask_address) as client:
            score_pools_with_dask([job.union for job in todo], client, on_progress=on_progress, finish=False)
            for future in [client.submit(write_reference_store, job, pure=False) for job in todo]:
                future.result()
        for job in todo:
            finish_pool_store(Path(job.union.pool_path))


def write_reference_store(job: ReferenceJob) -> str:
    """Every mode's patch scores of the night's images from the union pool's similarity table."""
    union = open_pool_store(Path(job.union.pool_path))
    similarity = union["similarity"]  # (R*Y, N+M, L, N+M)
    n = job.n_night
    n_maps = similarity.shape[0]
    n_references = similarity.shape[1] - n
    few_shot = np.asarray(union["patch_scores"][:n])  # row tasks: K over the N - 1 + M other images
    plus = []
    for start in range(0, n, _NIGHT_BLOCK):
        to_references = torch.from_numpy(similarity[:, start : min(start + _NIGHT_BLOCK, n), :, n:])
        plus.append(torch.stack([nearest_reference_distances(s) for s in to_references]).double().mean(dim=0))
    plus_scores = torch.cat(plus).float()
    # the references themselves: zero-shot against the night (as one more night image), MuSc+ leave-one-out
    reference_rows = torch.from_numpy(similarity[:, n:, :, :])  # (R*Y, M, L, N+M)
    to_night = reference_rows[..., :n]
    k = neighbour_count(n + 1, job.union.msm.interval)
    own = torch.full((n_references,), n)
    padded = torch.cat([to_night, torch.full_like(to_night[..., :1], -1.0)], dim=-1)
    reference_zero_shot = torch.stack([scores_from_similarities(s, own, k) for s in padded]).double().mean(dim=0)
    reference_plus = torch.stack([leave_one_out_distances(s) for s in reference_rows[..., n:]]).double().mean(dim=0)
    zero_shot = torch.from_numpy(np.asarray(open_pool_store(Path(job.zero_shot_path))["patch_scores"][:]))
    zero_shot_scale, plus_scale = reference_scale(reference_zero_shot), reference_scale(reference_plus)
    combined = combined_scores(zero_shot, plus_scores, zero_shot_scale, plus_scale)
    chosen = {"few-shot": torch.from_numpy(few_shot), "plus": plus_scores, "combined": combined}[job.mode]

    night = pool_layout(Path(job.zero_shot_path))
    path = Path(job.store_path)
    if path.exists():
        shutil.rmtree(path)
    create_pool_store(
        path,
        night,
        {
            "reference_set": job.reference_label,
            "reference_mode": job.mode,
            "zero_shot_pool": Path(job.zero_shot_path).name,
        },
    )
    group = open_pool_store(path, "r+")
    with disk_space_for(path / "patch_scores", chosen.numel() * chosen.element_size()):
        group["patch_scores"][:] = chosen.numpy()
    scales = {"zero_shot_scale": zero_shot_scale, "plus_scale": plus_scale, "n_maps": n_maps}
    for name, values in (
        ("zero_shot", zero_shot),
        ("few_shot", few_shot),
        ("plus", plus_scores),
        ("combined", combined),
        ("reference_zero_shot", reference_zero_shot),  # (M, L): the repeated-defect evidence (`days`) reads
        ("reference_plus", reference_plus),  # these beside the night's, so its rule needs no rescoring
    ):
        write_pool_array(path, name, np.asarray(values, dtype=np.float32), scales)
    _mark_rows(path, night)
    finish_pool_store(path)
    return str(path)


def _mark_rows(path: Path, layout: PoolLayout) -> None:
    """The row checksums `pool_store_intact` verifies, as the pool's row tasks write them."""
    scores = open_pool_store(path)["patch_scores"]
    for block in range(layout.n_blocks):
        mark_done(path, f"row-{block}", array_digest(scores[layout.block_rows(block)]))
