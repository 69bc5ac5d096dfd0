"""Backfill: score past days (typically with another backbone); results land beside the old ones."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

from prefect import flow, get_run_logger

from flows.score import score_captures
from musc_tasks import tables
from musc_tasks.config import PRESETS, BackboneSpec, ScoringParams
from musc_tasks.layout import day_input


@flow(name="backfill-days")
def backfill_days(
    date_from: date,
    date_to: date,
    input_pattern: str,
    out_dir: str,
    backbone: BackboneSpec = PRESETS["fast"],
    scoring: ScoringParams = ScoringParams(),
    device: str = "auto",
    dask_address: str | None = None,
    force: bool = False,
) -> dict[str, str]:
    """Score every day from ``date_from`` to ``date_to`` (inclusive) with ``backbone``.

    ``input_pattern`` holds ``{date}``. A day already completed with this backbone, these
    parameters and this input is skipped unless ``force``; tokens of other backbones stay,
    and tokens of this backbone are reused wherever they exist.
    """
    if "{date}" not in input_pattern:
        raise ValueError(f"input_pattern must contain {{date}}, got {input_pattern!r}")
    if date_to < date_from:
        raise ValueError(f"date_to {date_to} is before date_from {date_from}")
    log = get_run_logger()
    outcome = {}
    day = date_from
    while day <= date_to:
        iso = day.isoformat()
        input_dir = day_input(input_pattern, iso)
        if not Path(input_dir).is_dir():
            outcome[iso] = f"no input folder {input_dir}"
        elif not force and _already_scored(Path(out_dir), iso, backbone, scoring, input_dir):
            outcome[iso] = "already scored with this backbone"
        else:
            summary = score_captures(
                input_dir=input_dir,
                out_dir=out_dir,
                run_date=day,
                backbone=backbone,
                scoring=scoring,
                device=device,
                dask_address=dask_address,
            )
            outcome[iso] = f"scored {summary.n_scored}, flagged {summary.n_flagged}"
        log.info("%s: %s", iso, outcome[iso])
        day += timedelta(days=1)
    return outcome


def _already_scored(out_dir: Path, day: str, backbone: BackboneSpec, scoring: ScoringParams, input_dir: str) -> bool:
    runs = tables.read_table(out_dir / "tables" / "runs")
    if runs.empty:
        return False
    runs = runs[(runs["date"] == day) & (runs["backbone_key"] == backbone.key) & (runs["status"] == "completed")]
    # Compared as parameters, not as JSON: a row written before a field was renamed still matches.
    return any(
        ScoringParams.model_validate(json.loads(row.parameters)["scoring"]) == scoring
        and Path(row.input_dir) == Path(input_dir)
        for row in runs.itertuples()
    )
