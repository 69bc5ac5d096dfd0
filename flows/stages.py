"""Stage bookkeeping for the flows: how long each stage took and what came from Prefect's cache."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from prefect.runtime import flow_run

from musc_tasks.manifests import PoolsRef, TokensRef
from musc_tasks.publish import RunInfo


@dataclass
class Stages:
    """Runs stage tasks for a flow, timing each and noting which came from Prefect's cache."""

    refresh: bool = False
    run_id: str = field(default_factory=lambda: str(flow_run.get_id() or uuid.uuid4()))
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    seconds: dict[str, float] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)

    def run(self, stage: str, stage_task, **arguments):
        """``stage_task(**arguments)``, bypassing cached results when ``refresh``."""
        began = time.perf_counter()
        state = stage_task.with_options(refresh_cache=self.refresh or None)(**arguments, return_state=True)
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
