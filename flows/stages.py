"""Stage bookkeeping for the flows: how long each stage took and what came from Prefect's cache."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prefect.runtime import flow_run

from musc_tasks.manifests import PoolsRef, TokensRef, missing_paths
from musc_tasks.publish import RunInfo

log = logging.getLogger(__name__)


@dataclass
class Stages:
    """Runs stage tasks for a flow, timing each and noting which came from Prefect's cache.

    The cached results and cache records of a run live under ``OUT/cache/prefect``, with the
    stores they point into, not in ``PREFECT_HOME``: deleting OUT deletes them too. A cache hit
    whose manifest names a store or file that no longer exists (``cache/tokens`` deleted) is
    not trusted: the stage runs again and its stores resume from what is left.
    """

    refresh: bool = False
    out_dir: str | None = None
    run_id: str = field(default_factory=lambda: str(flow_run.get_id() or uuid.uuid4()))
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    seconds: dict[str, float] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)

    def run(self, stage: str, stage_task, **arguments):
        """``stage_task(**arguments)``, bypassing cached results when ``refresh``."""
        began = time.perf_counter()
        options = {}
        if self.out_dir is not None and stage_task.persist_result:
            records = Path(self.out_dir) / "cache" / "prefect"
            options["result_storage"] = records  # a Path: Prefect stores there, no saved block needed
        state = stage_task.with_options(refresh_cache=self.refresh or None, **options)(**arguments, return_state=True)
        if state.name == "Cached":
            missing = missing_paths(state.result())
            if missing:
                log.warning(
                    "%s: cached result names %d missing path(s), e.g. %s; recomputing", stage, len(missing), missing[0]
                )
                state = stage_task.with_options(refresh_cache=True, **options)(**arguments, return_state=True)
        self.seconds[stage] = time.perf_counter() - began
        if state.name == "Cached":
            self.cached.add(stage)
        return state.result()

    def info(self, tokens: tuple[TokensRef, ...], pools: tuple[PoolsRef, ...]) -> RunInfo:
        """What the run table records about this run; work served from cache counts as cached."""
        extracted = 0 if "extract" in self.cached else sum(t.extracted for t in tokens)
        computed = 0 if "score" in self.cached else sum(p.pairs_computed for p in pools)
        counts = {
            "images_extracted": extracted,
            "images_token_cached": sum(t.extracted + t.reused for t in tokens) - extracted,
            "pairs_computed": computed,
            "pairs_cached": sum(p.pairs_computed + p.pairs_reused for p in pools) - computed,
        }
        flow_run_id = flow_run.get_id()
        return RunInfo(
            run_id=self.run_id,
            flow_run_id=str(flow_run_id) if flow_run_id else None,
            started_at=self.started_at,
            seconds=dict(self.seconds),
            cache_counts=counts,
        )
