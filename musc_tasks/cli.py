"""The `musc` command: score a day, run the demo, rebuild a report, fetch weights."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterable
from datetime import date
from functools import partial
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel

from . import preflight
from .atomic import disk_full_message, is_disk_full
from .config import PRESETS, BackboneSpec, OutputPolicy, ReferenceMode, ScoringParams
from .layout import day_input
from .preflight import UsageError

logger = logging.getLogger("musc")

TINY_CONFIG = Path(__file__).parent / "model_configs" / "musc-tiny-vit.json"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _threshold(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The backbone options: a preset and what overrides it."""
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="paper",
        help="paper: ViT-L-14-336/openai@518; fast: ViT-B-16-plus-240/laion400m_e31@512; "
        "dinov2: dinov2_vitl14/lvd142m@518",
    )
    group.add_argument(
        "--backbone",
        help="open_clip model, dinov2_vits14|vitb14|vitl14, dino_vitbase8|16, or timm:<model> (overrides the preset's)",
    )
    group.add_argument(
        "--pretrained",
        help="pretrained tag (open_clip's; timm's for DINO), a checkpoint file (Meta's *_pretrain.pth), "
        "or 'none' (random)",
    )
    group.add_argument(
        "--model-config", type=Path, help="model config JSON registering an extra architecture (open_clip or timm)"
    )
    group.add_argument("--image-size", type=int, help="side S the images are squashed to (multiple of the patch size)")
    group.add_argument("--layers", type=_int_list, help="0-based blocks to score, e.g. 5,11,17,23")
    group.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the ViT runs (auto: cuda if present)"
    )


def add_reference_mode_argument(parser: argparse.ArgumentParser) -> None:
    """``--reference-mode``, the modes and default of the flows' ``reference_mode``."""
    parser.add_argument(
        "--reference-mode",
        choices=get_args(ReferenceMode),
        default="combined",
        help="how references score the night (README: Known-good references); default combined",
    )


def _shown(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def _model_option(group, model: type[BaseModel], flag: str, field: str, help: str, **kwargs) -> None:
    """An option stored under a parameter model's field name with that field's default (`HelpFormatter` shows it).

    The model is the one place a default is set; a Literal field offers its values as the choices.
    """
    info = model.model_fields[field]
    if get_origin(info.annotation) is Literal:
        kwargs["choices"] = get_args(info.annotation)
    else:
        kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
    group.add_argument(flag, dest=field, default=info.default, help=help, **kwargs)


def _model_from_args(model: type[BaseModel], args: argparse.Namespace, **overrides):
    """The model from whichever of its options a command has (each stored under its field's name)."""
    given = {field: getattr(args, field) for field in model.model_fields if getattr(args, field, None) is not None}
    return model(**{**given, **overrides})


def add_msm_arguments(group: argparse._ArgumentGroup) -> None:
    """Mutual scoring options shared by every command that scores."""
    option = partial(_model_option, group, ScoringParams)
    option("--r", "r_list", "LNAMD aggregation degrees", type=_int_list)
    option(
        "--msm-precision",
        "msm_precision",
        "GEMM input dtype of mutual scoring; bfloat16/float16 are for GPUs (scores move by ~1e-3)",
    )
    group.add_argument("--dask-address", help="scheduler address of an existing Dask cluster (default: a local one)")


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The scoring options of the score and backfill commands, defaults from ScoringParams."""
    group = parser.add_argument_group("scoring")
    add_msm_arguments(group)
    option = partial(_model_option, group, ScoringParams)
    option("--rscin-k", "rscin_k", "RsCIN window sizes", type=_int_list)
    option("--pool-size", "pool_size", "largest pool scored together", type=int)
    option("--threshold", "threshold", "image threshold on the final score: auto or a value", type=_threshold)
    option("--pixel-threshold", "pixel_threshold", "pixel threshold on the map: auto or a value", type=_threshold)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The heatmap size policy of the score command, defaults from OutputPolicy."""
    group = parser.add_argument_group("outputs (heatmap size policy; masks are always full-size PNG)")
    option = partial(_model_option, group, OutputPolicy)
    option("--heatmap-format", "heatmap_format", "heatmap encoding; png is lossless")
    option("--heatmap-quality", "heatmap_quality", "JPEG/WebP quality 1-100, WebP 100 = lossless", type=int)
    option("--heatmap-long-side", "long_side", "long side in pixels of the other heatmaps", type=int)
    option(
        "--full-resolution-top",
        "full_resolution_top",
        "heatmaps at the capture's resolution: flagged images and this many top ranks per product",
        type=int,
    )


def outputs_from_args(args: argparse.Namespace) -> OutputPolicy:
    """OutputPolicy from the output options."""
    return _model_from_args(OutputPolicy, args)


def backbone_from_args(args: argparse.Namespace) -> BackboneSpec:
    """The preset, with whatever the command line overrides."""
    # Before the geometry lookup below imports torch and open_clip or timm: a typo costs a second.
    if args.backbone:
        preflight.check_backbone_name(args.backbone, args.model_config)
    preflight.check_checkpoint(args.pretrained)
    spec = PRESETS[args.preset]
    update: dict = {}
    if args.model_config:
        update["model_config_path"] = args.model_config.resolve()
    if args.backbone and args.backbone != spec.name:
        from .config import default_pretrained, native_geometry

        update["name"] = args.backbone
        size, blocks = native_geometry(args.backbone, args.model_config)
        update["image_size"] = size
        # the preset's rule: the last block of each quarter of the network
        update["layers"] = tuple(blocks * q // 4 - 1 for q in (1, 2, 3, 4))
        update["pretrained"] = default_pretrained(args.backbone, args.model_config)
    if args.pretrained is not None:
        update["pretrained"] = args.pretrained
    if args.image_size:
        update["image_size"] = args.image_size
    if args.layers:
        update["layers"] = args.layers
    return BackboneSpec(**{**spec.model_dump(), **update})


def scoring_from_args(args: argparse.Namespace, **overrides) -> ScoringParams:
    """ScoringParams from the scoring options a command has; ``overrides`` win."""
    return _model_from_args(ScoringParams, args, **overrides)


def validate_scoring(args: argparse.Namespace) -> BackboneSpec:
    """The checks every scoring command shares, before anything heavy starts; the backbone."""
    preflight.check_pool_size(args.pool_size)
    try:
        backbone = backbone_from_args(args)
    except ValueError as error:  # pydantic's: keep the message, not the dump
        raise UsageError(_first_line(error)) from None
    preflight.check_backbone(backbone)
    return backbone


def placement_from_args(args: argparse.Namespace) -> dict:
    """``device`` and ``dask_address``: where a scoring flow runs the ViT and the Dask work."""
    return {"device": args.device, "dask_address": args.dask_address}


def local_cluster_starting(
    backbone: BackboneSpec,
    device: str,
    dask_address: str | None = None,
    inputs: Iterable[str | os.PathLike] | None = None,
) -> contextlib.AbstractContextManager:
    """The block in which the command calls its flow: the run's local Dask cluster starts and warms at once.

    Its workers' imports and model build then overlap the flows' imports and the Prefect
    server's start, and the flow's `run_cluster` takes it over (`cluster.local_cluster_starting`).
    Entered after the server's start began: the flow waits for the server, and starting the
    cluster first (its scheduler and nannies run in this process) delayed that start by 4-8 s on
    2 busy cores (docs/performance.md). Nothing starts with ``dask_address``, nor when none of
    ``inputs`` (the folders the flow reads; None: input known to hold images) holds an image
    file: the flow's own guard, so a night without images starts no cluster.
    """
    if not _runs_local_cluster(dask_address, inputs):
        return contextlib.nullcontext()
    from .cluster import local_cluster_starting as starting

    return starting(backbone, device)


def start_worker_forkserver(
    dask_address: str | None = None,
    inputs: Iterable[str | os.PathLike] | None = None,
    backbone: BackboneSpec | None = None,
    device: str = "auto",
) -> None:
    """Start the process the local workers are forked from, if the command starts them (`local_cluster_starting`).

    Called once the options are checked and before the Prefect server's start, the command's
    first thread (`cluster.start_forkserver`): its imports then run beside the command's own,
    and with ``backbone`` it loads the model once for the workers (on the CPU).
    """
    if _runs_local_cluster(dask_address, inputs):
        from .cluster import start_forkserver

        start_forkserver(backbone, device)


def _runs_local_cluster(dask_address: str | None, inputs: Iterable[str | os.PathLike] | None) -> bool:
    return not dask_address and (inputs is None or any(preflight.holds_image(folder) for folder in inputs))


def references_from_args(args: argparse.Namespace) -> dict:
    """``references`` and ``reference_mode``: the known-good images the nights are also scored against, and how."""
    return {"references": args.references, "reference_mode": args.reference_mode}


def _first_line(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
    return str(error).splitlines()[0]


def cmd_score(args: argparse.Namespace) -> int:
    """``musc score``: one day's folder."""
    run_date = preflight.parse_day(args.date) if args.date else date.today()
    preflight.require_images(day_input(args.input, run_date.isoformat()), "input folder")
    backbone = validate_scoring(args)
    try:
        outputs, scoring = outputs_from_args(args), scoring_from_args(args)
    except ValueError as error:
        raise UsageError(_first_line(error)) from None
    # INPUT holds an image: checked above
    start_worker_forkserver(args.dask_address, backbone=backbone, device=args.device)
    from flows.server import server_starting

    with contextlib.ExitStack() as run:
        with server_starting():  # the temporary Prefect server starts while the flows import
            run.enter_context(local_cluster_starting(backbone, args.device, args.dask_address))
            from flows.score import score_captures

        summary = score_captures(
            input_dir=args.input if "{date}" in args.input else str(Path(args.input).resolve()),
            out_dir=str(Path(args.out).resolve()),
            run_date=run_date,
            backbone=backbone,
            scoring=scoring,
            refresh=args.refresh,
            outputs=outputs,
            **placement_from_args(args),
            **references_from_args(args),
        )
    print_summary(summary)
    return 0


SUMMARY_TOP = 5  # parts the console summary lists; the report and tables have them all


def print_summary(summary) -> None:
    """A run's counts, timings, most anomalous images and output folders, for a person."""
    print()
    print(f"MuSc {summary.run_date}  backbone {summary.backbone_key}")
    counts = f"scored {summary.n_scored}, flagged {summary.n_flagged}, failed {summary.n_failed}"
    print(f"  images {summary.n_images}: {counts}")
    for alert in summary.alerts:
        print(f"  {alert}")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.seconds.items()))
    tokens = f"tokens extracted {summary.images_extracted} (cached {summary.images_token_cached})"
    print(f"  {tokens}; block pairs computed {summary.pairs_computed} (cached {summary.pairs_cached})")
    if summary.top:
        shown = summary.top[:SUMMARY_TOP]
        print("  most anomalous (* flagged; margin in robust sd above the image threshold):")
        for part in shown:
            margin = "" if part.margin is None else f"  margin {part.margin:+.1f}"
            print(f"  {'*' if part.flagged else ' '} {part.score:.4f}  {part.product}  {part.path}{margin}")
            if part.flagged:
                print(f"      heatmap {part.heatmap_path}")
        unlisted = summary.n_flagged - sum(part.flagged for part in shown)
        if unlisted > 0:
            print(f"    {unlisted} more flagged: see the report or tables/scores (flagged = true)")
    out = Path(summary.out_dir)
    print(f"  tables:   {out / 'tables'}  (scores/, regions/, runs/)")
    print(f"  masks:    {out / 'masks' / summary.run_date}")
    print(f"  heatmaps: {out / 'heatmaps' / summary.run_date}")
    if summary.report_path:
        print(f"  report:   {summary.report_path}")


def cmd_demo(args: argparse.Namespace) -> int:
    """``musc demo``: a synthetic day with planted defects, scored (offline: tiny random ViT)."""
    start_worker_forkserver()
    from flows.server import server_starting

    out = Path(args.out).resolve()
    with contextlib.ExitStack() as run:
        with server_starting():  # the temporary Prefect server starts while the flows import and the day is drawn
            backbone = demo_backbone()
            # The day is drawn below, so it holds images: the workers warm while the flows import and it is drawn.
            run.enter_context(local_cluster_starting(backbone, args.device))
            from flows.score import score_captures

            from .demo import make_bad_night, make_demo_day

            if args.bad_night:
                day = make_bad_night(out / "bad-night-input", seed=args.seed)
                print(
                    f"bad night: {sum(i.is_defective for i in day.images)} of {len(day.images)} {day.product} parts "
                    f"carry the same defect at the same place; known-good references in {day.golden_dir}"
                )
            else:
                day = make_demo_day(out / "demo-input", seed=args.seed)
        summary = score_captures(
            input_dir=str(day.input_dir),
            out_dir=str(out),
            run_date=date.today(),
            backbone=backbone,
            scoring=ScoringParams(),
            device=args.device,
            references=str(day.golden_dir) if args.bad_night else None,
        )
    print_summary(summary)
    print(f"  planted ground truth: {day.ground_truth_dir}")
    return 0


def demo_backbone() -> BackboneSpec:
    """The demo's backbone: the fast preset where its weights are cached or downloadable, else the tiny random ViT."""
    from .backbone import WeightsUnavailable, resolve_checkpoint

    backbone = PRESETS["fast"]
    try:
        resolve_checkpoint(backbone)
    except WeightsUnavailable as error:
        banner = "!" * 78
        print(
            f"{banner}\nOFFLINE: {error}\nThe demo runs the tiny RANDOM ViT instead: the pipeline runs end to end, "
            f"but the scores carry no learned meaning.\n{banner}",
            file=sys.stderr,
        )
        backbone = BackboneSpec(
            name="musc-tiny-vit", pretrained=None, image_size=224, layers=(1, 2, 3), model_config_path=TINY_CONFIG
        )
    return backbone


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``musc evaluate``: the paper's metrics on a benchmark dataset."""
    from .datasets import DEFAULT_RSCIN_K, LAYOUT_HINT, list_categories

    root = preflight.existing_dir(args.root, "dataset root")
    found = list_categories(root, args.layout)
    if not found:
        raise UsageError(f"dataset root {root} holds no {args.layout} category: {LAYOUT_HINT[args.layout]}")
    missing = sorted(set(args.categories.split(",")) - set(found)) if args.categories else []
    if missing:
        raise UsageError(f"--categories {','.join(missing)} not under {root}; found: {','.join(found)}")
    categories = args.categories.split(",") if args.categories else found
    preflight.check_shots(root, args.layout, categories, args.shots, args.references, args.reference_mode)
    backbone = validate_scoring(args)
    scoring = scoring_from_args(
        args, rscin_k=args.rscin_k or DEFAULT_RSCIN_K[args.layout], pool_size=args.pool_size or 100_000
    )
    start_worker_forkserver(args.dask_address, [root], backbone, args.device)
    from flows.server import server_starting

    with contextlib.ExitStack() as run:
        with server_starting():  # the temporary Prefect server starts while the flows import
            run.enter_context(local_cluster_starting(backbone, args.device, args.dask_address, [root]))
            from flows.evaluate import evaluate_dataset

        rows = evaluate_dataset(
            root=str(Path(args.root).resolve()),
            layout=args.layout,
            out_dir=str(Path(args.out).resolve()),
            categories=tuple(args.categories.split(",")) if args.categories else None,
            divide_num=args.divide_num,
            backbone=backbone,
            scoring=scoring,
            mask_mode=args.mask_mode,
            **placement_from_args(args),
            shots=args.shots,
            seed=args.shot_seed,
            reference_mode=args.reference_mode,
        )
    print(metrics_table(rows))
    if args.shots:
        print(f"few-shot: {args.shots} train images per category (seed {args.shot_seed}), mode {args.reference_mode}")
    return 0


def metrics_table(rows: list[dict]) -> str:
    """The paper's Table 1 layout, in percent."""
    columns = [
        ("AUROC-cls", "image_auroc"),
        ("F1-cls", "image_f1_max"),
        ("AP-cls", "image_ap"),
        ("AUROC-seg", "pixel_auroc"),
        ("F1-seg", "pixel_f1_max"),
        ("AP-seg", "pixel_ap"),
        ("AUPRO@0.3", "aupro"),
        ("PRO-musc", "pro_musc"),
    ]
    width = max([len(r["category"]) for r in rows] + [8])
    lines = [f"{'category':<{width}} " + " ".join(f"{name:>9}" for name, _ in columns)]
    for row in rows:
        values = " ".join(f"{100 * row[key]:>9.1f}" if row[key] is not None else f"{'-':>9}" for _, key in columns)
        lines.append(f"{row['category']:<{width}} {values}")
    return "\n".join(lines)


def cmd_backfill(args: argparse.Namespace) -> int:
    """``musc backfill`` (deprecated alias ``rescore``): score a range of past days."""
    date_from, date_to = preflight.parse_day(args.date_from, "--from"), preflight.parse_day(args.date_to, "--to")
    if date_from > date_to:
        raise UsageError(f"--from {date_from} is after --to {date_to}: the range is inclusive, first day first")
    if "{date}" not in args.input_root:
        raise UsageError(f"--input-root {args.input_root!r} has no {{date}}: e.g. /data/captures/{{date}}")
    backbone = validate_scoring(args)
    backfill = {
        "date_from": date_from,
        "date_to": date_to,
        "input_pattern": args.input_root,
        "out_dir": str(Path(args.out).resolve()),
        "backbone": backbone,
        "scoring": scoring_from_args(args),
        "force": args.force,
        **references_from_args(args),
    }
    from flows.server import server_starting

    with contextlib.ExitStack() as run:
        with server_starting():  # the temporary Prefect server starts while the flows import
            from flows.backfill import backfill_days, inputs_to_score

            # The range's one cluster, for every day's flow, if a day it will score holds an image:
            # started after the flows' import, which tells which days are done already.
            inputs = inputs_to_score(**backfill)
            run.enter_context(local_cluster_starting(backbone, args.device, args.dask_address, inputs))

        if args.command == "rescore":
            print(
                "musc: 'rescore' is deprecated and will be removed in the next release; use 'musc backfill'",
                file=sys.stderr,
            )
        outcome = backfill_days(**backfill, **placement_from_args(args))
    for day, what in outcome.items():
        print(f"{day}  {what}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``musc compare``: two backbones' scores of one day side by side."""
    preflight.parse_day(args.date)
    names = args.backbones.split(",")
    if len(names) != 2:
        raise UsageError(f"--backbones takes two names separated by a comma, got {args.backbones!r}")
    if not (Path(args.out) / "tables" / "scores").is_dir():
        raise UsageError(f"--out {args.out} holds no scores table (tables/scores): score a day into it first")
    from . import tables
    from .compare import compare_backbones, resolve_backbone_key

    scores = tables.read_table(Path(args.out) / "tables" / "scores")
    day = scores[scores["date"] == args.date]
    if day.empty:
        dates = sorted(scores["date"].dt.strftime("%Y-%m-%d").unique())
        raise UsageError(f"--date {args.date}: no results for that day in {args.out}; days with results: {dates}")
    available = sorted(day["backbone_key"].unique())
    key_a, key_b = (resolve_backbone_key(name, available) for name in names)
    summary, changed = compare_backbones(day, key_a, key_b)
    print(f"{args.date}: A = {key_a}\n{' ' * len(args.date)}  B = {key_b}\n")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{len(changed)} image(s) changed flag:")
    if len(changed):
        print(changed.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_rscin(args: argparse.Namespace) -> int:
    """Re-score another method's score table with RsCIN and write it next to the original scores."""
    from .rscin_plugin import read_score_table, rscin_rescore_scores, write_score_table

    rescored = rscin_rescore_scores(
        read_score_table(Path(args.scores)),
        args.images,
        backbone_from_args(args),
        k_list=args.rscin_k,
        path_column=args.path_column,
        score_column=args.score_column,
        product_column=args.product_column,
        token_cache=args.cache,
        device=args.device,
    )
    write_score_table(rescored, Path(args.out))
    status = rescored["rscin_status"]
    products = rescored.loc[status == "rescored", args.product_column or "product"].nunique()
    print(
        f"{len(rescored)} rows: {(status == 'rescored').sum()} re-scored in {products} product(s), "
        f"{(status == 'failed').sum()} failed, {(status == 'not_rescored').sum()} not re-scored -> {args.out}"
    )
    for _, row in rescored[status != "rescored"].head(10).iterrows():
        print(f"  {row[args.path_column]}: {row['rscin_reason']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``musc report``: (re)build a night's report and the index of nights from OUT alone."""
    from . import tables
    from .report import build_day_report

    out = Path(args.out).resolve()
    day = args.date
    if day is None:
        dates = tables.read_table(out / "tables" / "scores")["date"]
        if dates.empty:
            raise ValueError(f"no results in {out / 'tables' / 'scores'}")
        day = dates.max().date().isoformat()
    report = build_day_report(out, day, args.backbone)
    print(report.path)
    print(f"  all nights: {report.path.parent.parent / 'index.html'}")
    return 0


QUERY_TABLES = ("scores", "regions", "runs", "days")


def query_views(out: Path) -> dict[str, Path]:
    """View name -> table folder: the nights' tables, ``eval_*`` and ``metrics`` of OUT/evaluation.

    ``metrics`` falls back to ``OUT/tables/metrics``, where evaluations went before they had a tree.
    """
    from .layout import evaluation_dir

    evaluation = evaluation_dir(out) / "tables"
    folders = {name: out / "tables" / name for name in QUERY_TABLES}
    folders |= {f"eval_{name}": evaluation / name for name in QUERY_TABLES}
    folders["metrics"] = evaluation / "metrics" if (evaluation / "metrics").is_dir() else out / "tables" / "metrics"
    return {name: folder for name, folder in folders.items() if any(folder.rglob("*.parquet"))}


def cmd_query(args: argparse.Namespace) -> int:
    """``musc query SQL``: DuckDB over OUT's tables, each a view named after it."""
    views = query_views(Path(args.out).resolve())
    if not views:
        raise UsageError(f"--out {args.out} holds no table (tables/{{scores,regions,runs}}): score a day into it first")
    import duckdb

    from . import tables

    connection = duckdb.connect()
    for name, folder in views.items():
        pattern = str(folder / "**" / "*.parquet").replace("'", "''")
        hive_types = tables.duckdb_hive_types(tables.partition_keys(folder))
        connection.execute(
            f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{pattern}', hive_partitioning = true, "
            f"hive_types = {hive_types}, union_by_name = true)"
        )
    try:
        result = connection.sql(args.sql)
    except duckdb.Error as error:
        raise UsageError(f"SQL: {str(error).splitlines()[0]} (views: {', '.join(views)})") from None
    if result is None:
        return 0
    frame = result.df()
    print(frame.to_string(index=False, max_rows=args.max_rows) if len(frame) else "(no rows)")
    return 0


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    """``musc fetch-weights``: download a backbone's weights into the Hugging Face cache."""
    backbone = backbone_from_args(args)
    from .backbone import resolve_checkpoint

    path = resolve_checkpoint(backbone)
    print(path)
    return 0


def cmd_references(args: argparse.Namespace) -> int:
    """``musc references add|curate|list|remove``: known-good reference sets per product and backbone."""
    from .references import (
        DEFAULT_MAX_REFERENCES,
        add_references,
        curate_references,
        describe,
        list_reference_sets,
        remove_references,
    )

    out = Path(args.out).resolve()
    if args.action == "list":
        backbone_key = backbone_from_args(args).key if args.backbone or args.preset != "paper" else None
        sets = list_reference_sets(out, backbone_key=backbone_key, product=args.product)
        for stored in sets:
            print(describe(stored))
        if not sets:
            print(f"no reference sets under {out}")
        return 0
    backbone = backbone_from_args(args)
    if args.action == "add":
        stored, problems = add_references(
            out,
            args.product,
            args.folders,
            backbone,
            name=args.name,
            max_size=args.max or DEFAULT_MAX_REFERENCES,
            device=args.device,
        )
        for line in problems:
            print(f"not added: {line}", file=sys.stderr)
        print(describe(stored))
        return 0
    if args.action == "curate":
        try:
            stored, picked = curate_references(
                out,
                args.product,
                backbone.key,
                args.date_from,
                args.date_to,
                name=args.name,
                max_size=args.max or DEFAULT_MAX_REFERENCES,
            )
        except ValueError as error:
            print(f"musc: error: {error}", file=sys.stderr)
            return 2
        per_night = picked.groupby("date").size()
        print(f"curated {len(picked)} images: " + ", ".join(f"{n} from {day}" for day, n in per_night.items()))
        print(describe(stored))
        return 0
    stored = remove_references(out, args.product, backbone.key, name=args.name, image_ids=args.folders)
    print(describe(stored) if stored else f"removed reference set {args.name!r} of {args.product!r}")
    return 0


def cmd_maps(args: argparse.Namespace) -> int:
    """``musc maps``: one image's raw anomaly map, upsampled to the capture's size."""
    import numpy as np

    from .maps import MapNotFound, read_map

    try:
        score_map, info = read_map(
            args.out, args.date, args.product, args.image, backbone_key=args.backbone, upsample=not args.patch_grid
        )
    except MapNotFound as error:
        print(f"musc: error: {error}", file=sys.stderr)
        return 2
    print(f"{info['path']}  ({info['store']})")
    print(f"  map {score_map.shape[0]} x {score_map.shape[1]}: min {score_map.min():.4f}, max {score_map.max():.4f}")
    above = float((score_map > info["pixel_threshold"]).mean())
    print(f"  pixel threshold {info['pixel_threshold']:.4f}: {above:.2%} of pixels above")
    if args.save:
        np.save(args.save, score_map)
        print(f"  saved {args.save} (float32)")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        if isinstance(action.default, tuple):
            return f"{text} (default: {_shown(action.default)})"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``musc`` argument parser with every command."""
    parser = argparse.ArgumentParser(
        prog="musc",
        description="Zero-shot anomaly detection (MuSc) for a day's product photos.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details and show tracebacks of errors"
    )
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=partial(argparse.ArgumentParser, formatter_class=HelpFormatter)
    )

    score = commands.add_parser("score", help="score a folder of captures: INPUT/<product>/**/*.png")
    score.add_argument("input", help="input folder; may contain {date}")
    score.add_argument("--out", required=True, help="results folder (tables/, masks/, heatmaps/, cache/)")
    score.add_argument("--date", help="YYYY-MM-DD of the captures (default: today)")
    score.add_argument("--refresh", action="store_true", help="ignore cached task results")
    score.add_argument(
        "--references", help="known-good images: a stored set's name (musc references) or a folder DIR/<product>/**"
    )
    add_reference_mode_argument(score)
    add_backbone_arguments(score)
    add_scoring_arguments(score)
    add_output_arguments(score)
    score.set_defaults(func=cmd_score)

    maps = commands.add_parser("maps", help="one image's raw anomaly map of a published day")
    maps.add_argument("image", help="path as in the scores table, path inside the product folder, file name or id")
    maps.add_argument("--out", required=True, help="results folder")
    maps.add_argument("--date", required=True, help="YYYY-MM-DD of the day")
    maps.add_argument("--product", required=True)
    maps.add_argument("--backbone", help="backbone key or a unique part of it (needed when a day has several)")
    maps.add_argument("--patch-grid", action="store_true", help="the stored patch-grid map, not upsampled")
    maps.add_argument("--save", help="write the map to this .npy file")
    maps.set_defaults(func=cmd_maps)

    demo = commands.add_parser("demo", help="generate a synthetic day with planted defects and score it")
    demo.add_argument("--out", default="demo-out", help="results folder; the synthetic day goes to OUT/demo-input")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic images and defects")
    demo.add_argument(
        "--bad-night",
        action="store_true",
        help="a night where one defect repeats at one place, scored with a golden set (README: bad nights)",
    )
    demo.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the ViT runs (auto: cuda if present)"
    )
    demo.set_defaults(func=cmd_demo)

    evaluate = commands.add_parser("evaluate", help="the paper's metrics on MVTec AD / VisA / BTAD test sets")
    evaluate.add_argument("root", help="dataset root")
    evaluate.add_argument(
        "--layout", required=True, choices=["mvtec", "visa", "btad"], help="the dataset's folder layout"
    )
    evaluate.add_argument(
        "--out", required=True, help="results folder; evaluations write OUT/evaluation/ (tables/metrics, masks, cache)"
    )
    evaluate.add_argument("--categories", help="comma-separated subset (default: all)")
    pools = evaluate.add_mutually_exclusive_group()
    pools.add_argument("--pool-size", type=int, help="split each category into seeded pools of at most N")
    pools.add_argument("--divide-num", type=int, help="the paper's split into D subsets stratified by defect type")
    evaluate.add_argument("--rscin-k", type=_int_list, help="default: 1,2,3 (MVTec AD, BTAD), 1,8,9 (VisA)")
    evaluate.add_argument(
        "--mask-mode", choices=["paper", "half"], default="paper", help="ground-truth resize rule (README)"
    )
    add_msm_arguments(evaluate.add_argument_group("scoring"))
    shots = evaluate.add_argument_group("few-shot (references from each category's train/good folder)")
    shots.add_argument(
        "--references", action="store_true", help="score with known-good references drawn from the training images"
    )
    shots.add_argument("--shots", type=int, help="K: references per category (with --references)")
    # not `seed`: BackboneSpec.seed (random weights) is another seed
    shots.add_argument("--seed", dest="shot_seed", type=int, default=0, help="seed of the draw of the K references")
    add_reference_mode_argument(shots)
    add_backbone_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    backfill = commands.add_parser(
        "backfill",
        aliases=["rescore"],
        help="score past days, e.g. with another backbone ('rescore': deprecated alias)",
    )
    backfill.add_argument("--from", dest="date_from", required=True, help="first day, YYYY-MM-DD")
    backfill.add_argument("--to", dest="date_to", required=True, help="last day, YYYY-MM-DD (inclusive)")
    backfill.add_argument("--input-root", required=True, help="input folder pattern containing {date}")
    backfill.add_argument("--out", required=True, help="results folder (tables/, masks/, heatmaps/, cache/)")
    backfill.add_argument("--force", action="store_true", help="score again days already done with this backbone")
    backfill.add_argument(
        "--references",
        help="score each day with known-good images too: a stored set's name or a folder DIR/<product>/**",
    )
    add_reference_mode_argument(backfill)
    add_backbone_arguments(backfill)
    add_scoring_arguments(backfill)
    backfill.set_defaults(func=cmd_backfill)

    compare = commands.add_parser("compare", help="rank correlation and changed flags between two backbones")
    compare.add_argument("--out", required=True, help="results folder holding tables/scores")
    compare.add_argument("--date", required=True, help="YYYY-MM-DD of the day to compare")
    compare.add_argument("--backbones", required=True, help="A,B: backbone keys, preset names or unique parts of keys")
    compare.set_defaults(func=cmd_compare)

    rscin = commands.add_parser("rscin", help="re-score another method's per-image scores with RsCIN (plug-in)")
    rscin.add_argument("--scores", required=True, help="CSV or Parquet table with a path and a score column")
    rscin.add_argument(
        "--images", required=True, help="images root: ROOT/<product>/**; the table's paths relative to it"
    )
    rscin.add_argument("--out", required=True, help="re-scored table, .csv or .parquet (input columns plus rscin_*)")
    _model_option(rscin, ScoringParams, "--k", "rscin_k", "RsCIN window sizes; VisA-like data: 1,8,9", type=_int_list)
    rscin.add_argument("--path-column", default="path", help="column of image paths, relative to --images")
    rscin.add_argument("--score-column", default="score", help="column of the other method's image scores")
    rscin.add_argument("--product-column", help="column naming each image's product (default: its folder under ROOT)")
    rscin.add_argument("--cache", help="a musc results folder whose token stores to reuse and extend")
    add_backbone_arguments(rscin)
    rscin.set_defaults(func=cmd_rscin)

    references = commands.add_parser(
        "references", help="known-good reference sets per product and backbone (add, curate, list, remove)"
    )
    actions = references.add_subparsers(dest="action", required=True)
    helps = {
        "add": "add a folder of known-good images to a product's set (tokens extracted once)",
        "curate": "pick references from past nights' scores (README: the curation rule; stored tokens)",
        "list": "the stored sets: product, name@version:content, size, backbone",
        "remove": "drop images (unique id prefixes) from a set, or the whole set",
    }
    for action, text in helps.items():
        sub = actions.add_parser(action, help=text)
        if action == "add":
            sub.add_argument("folders", nargs="+", help="folders of known-good images of the product")
        if action in ("add", "curate"):
            sub.add_argument("--max", type=int, help="size cap of the set (default 64)")
        if action == "curate":
            sub.add_argument("--from", dest="date_from", required=True, help="first night, YYYY-MM-DD")
            sub.add_argument("--to", dest="date_to", required=True, help="last night, YYYY-MM-DD (inclusive)")
        if action == "remove":
            sub.add_argument("folders", nargs="*", metavar="image_ids", help="image ids to drop (default: the set)")
        sub.add_argument("--out", required=True, help="results folder whose token stores the set uses")
        sub.add_argument("--product", required=action != "list", help="product the images show")
        default_name = "curated" if action == "curate" else "golden"
        sub.add_argument("--name", default=default_name, help=f"the set's name (default {default_name})")
        add_backbone_arguments(sub)
        sub.set_defaults(func=cmd_references)

    report = commands.add_parser("report", help="(re)build a night's HTML report and the index of nights")
    report.add_argument("--date", help="YYYY-MM-DD of the night (default: the latest with results)")
    report.add_argument("--out", default=".", help="results folder (default: the current one)")
    report.add_argument("--backbone", help="backbone key to show (default: the night's latest run)")
    report.set_defaults(func=cmd_report)
    query = commands.add_parser(
        "query",
        help="SQL (DuckDB) over the results: views scores, regions, runs, days of OUT/tables; "
        "eval_scores, ..., metrics of OUT/evaluation/tables",
    )
    query.add_argument("sql", help='e.g. "SELECT product, path, score FROM scores WHERE rank <= 5"')
    query.add_argument("--out", required=True, help="results folder holding tables/")
    query.add_argument("--max-rows", type=int, default=60, help="rows printed at most")
    query.set_defaults(func=cmd_query)

    fetch = commands.add_parser("fetch-weights", help="download a backbone's weights into the Hugging Face cache")
    add_backbone_arguments(fetch)
    fetch.set_defaults(func=cmd_fetch_weights)
    return parser


def quiet_console(verbose: bool) -> None:
    """Progress bars, warnings and the summary on the console; ``-v`` adds INFO logs.

    Prefect's and Dask's loggers carry their own INFO levels (Dask sets them when first
    imported, also in each worker process), so the console handler filters, and Dask's
    workers, which configure logging themselves, get the level through Dask's config.
    Runs logged to a Prefect server keep their INFO records.
    """
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if not verbose:
        handler.addFilter(_not_reported_by_main)
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def _not_reported_by_main(record: logging.LogRecord) -> bool:
    """Drop Prefect's records of a run that failed on a full disk or a lost server: `main` says it in one line."""
    if not record.name.startswith("prefect"):
        return True
    error = record.exc_info[1] if record.exc_info else None
    if is_disk_full(error) or _lost_server(error):
        return False
    message = record.getMessage()
    return not any(f"{name}:" in message or f"{name}(" in message for name in ("DiskFull", "ConnectError"))


def _lost_server(error: BaseException | None) -> bool:
    """Whether ``error`` is the Prefect API not answering (after the client's own retries)."""
    if error is None or "httpx" not in sys.modules:
        return False
    import httpx

    return isinstance(error, httpx.TransportError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``musc`` command; bad paths and values end with a one-line error and status 2."""
    args = build_parser().parse_args(argv)
    quiet_console(args.verbose)
    os.environ.setdefault("MUSC_PROGRESS", "1")
    # Without a Prefect server, each command starts a temporary one whose first start in a
    # fresh PREFECT_HOME creates its database: Prefect's 20 s limit is too short on a busy
    # small machine. Set before Prefect is first imported, which reads its settings then.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Nothing phones home: the temporary Prefect server's telemetry and every library that
    # honours DO_NOT_TRACK stay off unless the user turns them on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    warnings.filterwarnings("default", message=".*RANDOM weights")
    try:
        return args.func(args)
    except Exception as error:
        message = _error_message(error, args.verbose)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


def _error_message(error: Exception, verbose: bool) -> str | None:
    """What `musc` prints instead of a traceback for an error a person can act on; None: the traceback.

    A usage error and an unreachable Dask scheduler always; bad paths and values, a full disk
    and a lost Prefect server unless ``-v`` asks for the traceback.
    """
    if isinstance(error, UsageError) or _scheduler_unreachable(error):
        return f"musc: error: {error}"
    if verbose:
        return None
    if isinstance(error, (FileNotFoundError, NotADirectoryError, ValueError)):
        return f"musc: error: {_first_line(error)} (run with -v for the traceback)"
    if is_disk_full(error):
        return f"musc: error: {disk_full_message(error)}"
    if _lost_server(error):
        from flows.server import TEMPORARY_API_URLS

        url = os.environ.get("PREFECT_API_URL")
        temporary = not url or url in TEMPORARY_API_URLS
        server = "this run's temporary Prefect server" if temporary else f"the Prefect server at {url}"
        # Prefect's API log handler may have left "All connection attempts failed" without its newline
        return (
            f"\nmusc: error: lost {server} ({type(error).__name__}: {_first_line(error)});"
            " run the same command again once it answers (finished work is kept)"
        )
    return None


def _scheduler_unreachable(error: Exception) -> bool:
    if not isinstance(error, RuntimeError):
        return False
    from .cluster import SchedulerUnreachable  # imports Dask: only when something failed

    return isinstance(error, SchedulerUnreachable)


class Terminated(SystemExit):
    """The exit a SIGTERM raises in the main thread (`_terminated`); its code is 128 + the signal's number."""


# The signal that ended the command, once `_terminated` ran: the exit status when main raised (`entry_point`),
# the exit `_terminated` raised or another error it became on its way.
_terminated_by: int | None = None


def _terminated(signum: int, frame) -> None:
    """SIGTERM (a scheduler's stop, ``timeout``, ``kill``) ends the command as Ctrl-C does, cleaning up.

    Python's default ends the process at once, running no exit handler: the temporary Prefect
    server, a child process, was left running with its port and database, and the local cluster
    was not closed. Raised in the main thread wherever it is, `Terminated` unwinds the command's
    blocks (the cluster closes) and `entry_point` runs the exit handlers (the server stops). In a
    flow run Prefect's own handler comes first: it marks the run crashed, then sends the signal
    again, to this handler.

    Wherever it is can be code that does not let the exit through: a garbage collector's callback
    (Dask's, in this process with the local scheduler) dropped it, and the command ran on to the
    end with status 0 (`_terminated_again` raises it again); pydantic's serializer (Prefect's
    settings, during the flows' imports) turned it into an error of its own, and the command
    ended with status 1 (`entry_point` gives 143).
    """
    global _terminated_by
    _terminated_by = signum
    sys.unraisablehook = _terminated_again
    raise Terminated(128 + signum)


def _terminated_again(unraisable) -> None:
    """``sys.unraisablehook``: a `Terminated` dropped where Python cannot raise it comes back at the next call.

    Python reports an exception it cannot raise (in a garbage collector's callback, a ``__del__``)
    to this hook and carries on. A profile function of the main thread (where the signal's handler
    ran, and this hook with it) raises the exit again at that thread's next call or return, in the
    code the signal interrupted; dropped again, it comes back here. Any other report goes to
    Python's own hook.
    """
    if isinstance(unraisable.exc_value, Terminated):
        sys.setprofile(_raise_terminated)
    else:
        sys.__unraisablehook__(unraisable)


def _raise_terminated(frame, event: str, arg) -> None:
    if frame.f_code is _terminated_again.__code__:
        return  # the hook's own last steps: raised there, the exit would be lost
    sys.setprofile(None)
    raise Terminated(128 + _terminated_by)


def entry_point() -> None:
    """The ``musc`` console script (and ``python -m musc_tasks.cli``): `main`, then the process ends at once.

    After the interpreter's own first steps of an exit (joining non-daemon threads, then the
    exit handlers: Prefect's log flush and server stop, logging's shutdown) and a flush of the
    output streams, ``os._exit`` skips the rest: tearing down an interpreter that imported
    torch took about 2 s after the last exit handler, for nothing (`ExitAfterClose` does the
    same for the local workers). The status is what ``sys.exit(main())`` gives: main's code,
    an argparse exit's, 120 if the output cannot be flushed. Anything else main raises leaves
    the ordinary way, with its traceback. Never used in-process: callers of `main` get its code.
    A SIGTERM ends the command with status 143 through the same steps (`_terminated`), also
    where the exit it raised came out of main as another exception.
    """
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = main()
    except SystemExit as exit:  # argparse: --help, a usage error
        if exit.code is not None and not isinstance(exit.code, int):
            raise  # a message: Python prints it and exits 1
        code = exit.code or 0
    except BaseException:
        if _terminated_by is None:
            raise
        code = 128 + _terminated_by  # the exit a SIGTERM raised, turned into another error on its way
    threading._shutdown()  # what the interpreter does first at exit: join non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # as the interpreter does when its final flush fails
            code = 120
    os._exit(code)


if __name__ == "__main__":
    entry_point()
