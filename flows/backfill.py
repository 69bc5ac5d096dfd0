"""Backfill: score past days (with another backbone, or with references); results land beside the old ones."""

from __future__ import annotations

import contextlib
import json
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger

from flows.score import score_captures
from musc_tasks import tables
from musc_tasks.cluster import run_cluster
from musc_tasks.config import PRESETS, BackboneSpec, ReferenceMode, ScoringParams
from musc_tasks.layout import day_input, reference_set_path
from musc_tasks.references import read_reference_set, reference_set_name


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
    references: str | None = None,
    reference_mode: ReferenceMode = "combined",
) -> dict[str, str]:
    """Score every day from ``date_from`` to ``date_to`` (inclusive) with ``backbone``.

    ``input_pattern`` holds ``{date}``. A day already completed with this backbone, these
    parameters and this input is skipped unless ``force``; tokens of other backbones stay,
    and tokens of this backbone are reused wherever they exist. ``references`` and
    ``reference_mode`` score each day against known-good images as ``musc score`` does; a day
    counts as done only when its published rows used the same mode and the set's current
    version (so a set that changed since re-scores the day).
    """
    references = references or None
    if "{date}" not in input_pattern:
        raise ValueError(f"input_pattern must contain {{date}}, got {input_pattern!r}")
    if date_to < date_from:
        raise ValueError(f"date_to {date_to} is before date_from {date_from}")
    # What every day is scored with, and so what a day already done must have been scored with.
    settings = {"backbone": backbone, "scoring": scoring, "references": references, "reference_mode": reference_mode}
    log = get_run_logger()
    outcome = {}
    # One local cluster for the whole range, not one per day: the first day that scores images
    # starts it warm (or the command already did), every day's flow runs on it, and it closes here.
    # With dask_address each day's flow checks that scheduler and uses it as it is.
    with run_cluster(None, shared=True) if dask_address is None else contextlib.nullcontext():
        for day in _days(date_from, date_to):
            iso = day.isoformat()
            input_dir = day_input(input_pattern, iso)
            left = left_as_is(Path(out_dir), iso, input_dir, force=force, **settings)
            if left is None:
                summary = score_captures(
                    input_dir=input_dir,
                    out_dir=out_dir,
                    run_date=day,
                    device=device,
                    dask_address=dask_address,
                    **settings,
                )
                left = f"scored {summary.n_scored}, flagged {summary.n_flagged}"
            outcome[iso] = left
            log.info("%s: %s", iso, outcome[iso])
    return outcome


def inputs_to_score(
    date_from: date,
    date_to: date,
    input_pattern: str,
    out_dir: str,
    backbone: BackboneSpec,
    scoring: ScoringParams,
    force: bool = False,
    references: str | None = None,
    reference_mode: ReferenceMode = "combined",
) -> list[str]:
    """The input folders of the days `backfill_days` with these arguments would score now, not leave as they are.

    `musc backfill` starts the range's local cluster only if one of them holds an image: a
    backfill whose days are all done starts none (a re-run of a done 3-day backfill took
    25-30 s with one on 2 busy cores, 11-12 s without).
    """
    settings = {"backbone": backbone, "scoring": scoring, "references": references or None}
    inputs = {day.isoformat(): day_input(input_pattern, day.isoformat()) for day in _days(date_from, date_to)}
    return [
        folder
        for iso, folder in inputs.items()
        if left_as_is(Path(out_dir), iso, folder, force=force, reference_mode=reference_mode, **settings) is None
    ]


def _days(date_from: date, date_to: date) -> list[date]:
    return [date_from + timedelta(days=n) for n in range((date_to - date_from).days + 1)]


def left_as_is(out_dir: Path, day: str, input_dir: str, force: bool, **settings) -> str | None:
    """Why the backfill leaves ``day`` as it is (no input folder, already scored with ``settings``); None: score it."""
    if not Path(input_dir).is_dir():
        return f"no input folder {input_dir}"
    if not force and _already_scored(out_dir, day, input_dir=input_dir, **settings):
        return "already scored with this backbone" + (" and these references" if settings["references"] else "")
    return None


def _already_scored(
    out_dir: Path,
    day: str,
    backbone: BackboneSpec,
    scoring: ScoringParams,
    input_dir: str,
    references: str | None = None,
    reference_mode: str = "combined",
) -> bool:
    """The day's published rows of this backbone come from a completed run with these settings.

    Settings: scoring parameters, input folder, and per product the reference set version and
    mode (none for zero-shot) that the rows record; a later run with other references replaced
    the rows, so the day is not done for these.
    """
    runs = tables.read_table(out_dir / "tables" / "runs")
    if runs.empty:
        return False
    runs = runs[(runs["date"] == day) & (runs["backbone_key"] == backbone.key) & (runs["status"] == "completed")]
    # Compared as parameters, not as JSON: a row written before a field was renamed still matches.
    matching = {
        row.run_id
        for row in runs.itertuples()
        if ScoringParams.model_validate(json.loads(row.parameters)["scoring"]) == scoring
        and Path(row.input_dir) == Path(input_dir).resolve()  # the runs record it resolved, as the flow ran it
    }
    if not matching:
        return False
    scores = tables.read_table(out_dir / "tables" / "scores", filters=[("date", "=", day)])
    scores = scores[(scores["backbone_key"] == backbone.key) & (scores["status"] == "scored")]
    if not set(scores["run_id"]) <= matching:
        return False
    for product, rows in scores.groupby("product"):
        expected = _expected_references(out_dir, backbone.key, product, references, reference_mode)
        used = {
            tuple(None if pd.isna(v) else v for v in pair) for pair in rows[["reference_set", "reference_mode"]].values
        }
        if used != {expected}:
            return False
    return True


def _expected_references(
    out_dir: Path, backbone_key: str, product: str, references: str | None, mode: str
) -> tuple[str | None, str | None]:
    """(reference_set label, mode) a score row of ``product`` records when scored with ``references`` now."""
    if references is None:
        return None, None
    name = reference_set_name(references)
    if reference_set_path(out_dir, backbone_key, product, name).is_file():
        return read_reference_set(out_dir, backbone_key, product, name).label, mode
    if (Path(references) / product).is_dir():
        return f"{name} (not stored yet)", mode  # a folder's set is stored on first use: matches no row
    return None, None  # no set for this product: scored zero-shot
