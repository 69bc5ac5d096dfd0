"""A whole `musc score` run against the in-memory core engine doing the same work in one process.

Usage (from the repository root):
    .venv/bin/python benchmarks/whole_run.py [--products 3 --images-per-product 30] [--repeats 3] [--json out.json]
    .venv/bin/python benchmarks/whole_run.py --products 3 --images-per-product 334 --resolution 2448x2048
    .venv/bin/python benchmarks/whole_run.py --backbone ViT-B-16 -- --pretrained none --image-size 224
    .venv/bin/python benchmarks/whole_run.py --site --repeats 3     # against a running Prefect server and Dask cluster

It writes a night (the demo's photos with planted defects at their own 224 px, or enlarged to
``--resolution`` as camera JPEGs by `factory_night.make_night`), runs `musc score` once into a
fresh Prefect home (its ephemeral server creates and migrates the home's database first: the
first-run cost, printed on its own line), then alternates, ``--repeats`` times:
- pipeline: `musc score` as a user runs it on an ordinary night (a fresh process with its own
  Prefect ephemeral server, in that Prefect home whose database now exists, as a site's or a
  user's ``~/.prefect`` after its first run, and its own Dask LocalCluster, into a fresh OUT),
  wall clock from start to exit; the run row of
  its `runs` table splits that into start-up (interpreter, imports, Prefect server, flow run),
  the stages, the flow's time outside them (the Dask cluster's start) and what follows the run
  row (the report, closing the cluster and the server, exit);
- engine: the same images in this process with the core functions on arrays: load the same
  backbone once, list the images and hash them (the ids that order and split pools as the
  catalog does), extract tokens with the pipeline's loading and preprocessing
  (`loading.load_blocks`, `Backbone.preprocess`, blocks of the stage's shard size, float16 as
  the store keeps them), `pool_patch_scores` per pool (LNAMD + MSM), then raw image scores,
  `rescore_images` (RsCIN) and thresholds per product. No stores, tables, masks or heatmaps.
The engine's parameters are the pipeline's: its backbone and scoring come from parsing the very
`musc score` command line with the CLI's own parser. Every repeat checks that the engine's raw
and final image scores equal the pipeline's table, and exits 1 when they do not.

Printed: both times, each one's breakdown, and the ratio pipeline / engine with and without
publish (tables, masks, heatmaps, maps: work the engine does not do) and for the three work
stages alone. The engine is timed after this process imported torch and open_clip; the
seconds a fresh interpreter needs for those imports are printed apart (the pipeline's
start-up pays them), and a last ratio compares the run with the engine as a script started
from the shell would take (the engine's time plus those imports). Extra `musc score` options go after ``--``.

``--site`` runs every `musc score` as a site that keeps its services running does: against one
`prefect server start` (``PREFECT_API_URL``) and one Dask cluster (`dask scheduler` and a
2-process `dask worker --nthreads 1 --preload musc_tasks.worker_imports`, ``--dask-address``),
both started before the first run and stopped after the last. The first run then finds the
workers cold (each loads the backbone with its first block); the repeats find the model in the
workers' cache, as every later night of a site does.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from day_scale import offline_env, run_musc_score  # noqa: E402
from factory_night import make_night, score_command  # noqa: E402

from musc_tasks import tables  # noqa: E402
from musc_tasks.backbone import load_backbone  # noqa: E402
from musc_tasks.catalog import IMAGE_SUFFIXES  # noqa: E402
from musc_tasks.cli import backbone_from_args, build_parser, scoring_from_args  # noqa: E402
from musc_tasks.config import BackboneSpec, ScoringParams  # noqa: E402
from musc_tasks.core import image_scores, pool_patch_scores, rescore_images, split_pool, upsample_maps  # noqa: E402
from musc_tasks.demo import PRODUCTS, make_demo_day  # noqa: E402
from musc_tasks.extract import extract_catalog  # noqa: E402
from musc_tasks.identity import file_digest  # noqa: E402
from musc_tasks.loading import load_blocks  # noqa: E402
from musc_tasks.rscin import robust_threshold  # noqa: E402

PIPELINE_STAGES = ("catalog", "extract", "score", "rescore", "publish")
WORK_STAGES = ("extract", "score", "rescore")  # what the engine does too (its rscin is the table's "rescore")
ENGINE_PARTS = ("load", "list", "extract", "score", "rscin")
# The engine extracts in the blocks the pipeline's tasks use (one token shard each).
SHARD_IMAGES = inspect.signature(extract_catalog).parameters["shard_images"].default
# The e2e equality tests hold the stage to the engine at 1e-6; the spec's bar against the authors' code is 1e-5.
TOLERANCE = 1e-5
SCORE_COLUMNS = ("path", "product", "status", "raw_score", "score", "image_threshold", "pixel_threshold")


@dataclass
class EngineRun:
    """What the engine computed: image path -> (raw score, final score), product -> (image, pixel threshold)."""

    scores: dict[str, tuple[float, float]]
    thresholds: dict[str, tuple[float, float]]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def night_images(input_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Product -> its (image id, path) in the catalog's order: sorted by content hash, duplicates once."""
    products = {}
    for folder in sorted(p for p in input_dir.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        by_id = {}
        for path in files:
            by_id.setdefault(file_digest(path), str(path))
        products[folder.name] = sorted(by_id.items())
    return products


def run_engine(input_dir: Path, spec: BackboneSpec, scoring: ScoringParams, device: str) -> EngineRun:
    """The whole night in this process with the core functions: extract, LNAMD + MSM per pool, RsCIN per product."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[part] = seconds.get(part, 0.0) + now - clock
        clock = now

    backbone = load_backbone(spec, device=device)
    lap("load")
    products = night_images(input_dir)
    lap("list")
    compute_dtype = None if scoring.msm_precision == "float32" else getattr(torch, scoring.msm_precision)
    side = spec.image_size
    scores: dict[str, tuple[float, float]] = {}
    thresholds: dict[str, tuple[float, float]] = {}
    with torch.inference_mode():
        for product, images in products.items():
            batches = [images[i : i + SHARD_IMAGES] for i in range(0, len(images), SHARD_IMAGES)]
            layer_blocks: list[list[torch.Tensor]] = [[] for _ in spec.layers]
            embedding_blocks = []
            for block in load_blocks(batches, backbone.preprocess, pin_memory=backbone.device.type == "cuda"):
                if block.failed:
                    raise SystemExit(f"the engine could not read {block.failed}")
                layer_tokens, embeddings = backbone.extract(block.pixels)
                for kept, tokens in zip(layer_blocks, layer_tokens):
                    kept.append(tokens.half())  # the token store keeps float16
                embedding_blocks.append(embeddings)
            tokens = [torch.cat(blocks) for blocks in layer_blocks]
            embeddings = torch.cat(embedding_blocks).numpy()
            lap("extract")
            pools = split_pool(len(images), scoring.pool_size, seed=scoring.pool_seed)
            patch = [
                pool_patch_scores(
                    [t[pool].to(backbone.device).float() for t in tokens],
                    backbone.grid,
                    scoring.r_list,
                    interval=scoring.interval,
                    compute_dtype=compute_dtype,
                ).cpu()
                for pool in pools
            ]
            lap("score")
            raw = np.concatenate(
                [
                    image_scores(upsample_maps(p[start : start + 16], backbone.grid, (side, side))).double().numpy()
                    for p in patch
                    for start in range(0, len(p), 16)  # bounded memory, as the stage: 16 maps at a time
                ]
            )
            order = [i for pool in pools for i in pool]
            final = rescore_images(raw, embeddings[order], scoring.rscin_k)
            thresholds[product] = (robust_threshold(final), robust_threshold(raw))  # as the stage's "auto"
            scores.update((images[i][1], (float(r), float(f))) for i, r, f in zip(order, raw, final))
            lap("rscin")
    return EngineRun(scores, thresholds, seconds={part: seconds.get(part, 0.0) for part in ENGINE_PARTS})


def score_differences(table_rows, engine: EngineRun) -> dict[str, float]:
    """Max |difference| of the raw and final scores (and the thresholds), the scores table vs the engine.

    Parameters
    ----------
    table_rows : DataFrame
        The pipeline's score rows: path, product, status, raw_score, score, image_threshold, pixel_threshold.
    engine : EngineRun

    Raises
    ------
    SystemExit
        When an image was not scored by both, or a number differs by more than `TOLERANCE`.
    """
    rows = {str(Path(r.path).resolve()): r for r in table_rows.itertuples()}
    mine = {str(Path(p).resolve()): v for p, v in engine.scores.items()}
    unscored = sorted(p for p, r in rows.items() if r.status != "scored")
    if unscored or set(rows) != set(mine):
        only = sorted(set(rows) ^ set(mine))
        raise SystemExit(
            f"pipeline and engine scored different images: not scored {unscored[:3]}, one-sided {only[:3]}"
        )
    raw = max(abs(rows[p].raw_score - mine[p][0]) for p in rows)
    final = max(abs(rows[p].score - mine[p][1]) for p in rows)
    threshold = max(
        max(
            abs(r.image_threshold - engine.thresholds[r.product][0]),
            abs(r.pixel_threshold - engine.thresholds[r.product][1]),
        )
        for r in rows.values()
    )
    if not (raw <= TOLERANCE and final <= TOLERANCE and threshold <= TOLERANCE):
        raise SystemExit(
            f"the engine's scores differ from the pipeline's table: max |raw difference| {raw:.3g}, "
            f"max |final difference| {final:.3g}, max |threshold difference| {threshold:.3g} (tolerance {TOLERANCE:g})"
        )
    return {"max_abs_diff_raw": raw, "max_abs_diff_score": final, "max_abs_diff_threshold": threshold}


def pipeline_breakdown(started_at: float, seconds: float, run) -> dict[str, float]:
    """Wall seconds of one `musc score` split by its run row (``started_at``: epoch seconds at the process start).

    start-up: to the flow's start (interpreter, imports, checks, Prefect's server, the flow run);
    the stages; the flow outside its stages (the run's Dask cluster start, locks, the day's
    signals); after the run row (the report, closing the cluster and the server, the exit).
    """
    flow_start = run["started_at"].timestamp() - started_at
    row_written = run["finished_at"].timestamp() - started_at
    stages = {stage: float(run[f"seconds_{stage}"]) for stage in PIPELINE_STAGES}
    return {
        "start-up": flow_start,
        **stages,
        "flow outside stages": row_written - flow_start - sum(stages.values()),
        "after the run row": seconds - row_written,
    }


def run_pipeline(
    command: list[str], out_dir: Path, prefect_home: Path, prefect_api: str | None = None
) -> tuple[dict, object]:
    """One `musc score` (a fresh process) in ``prefect_home``; its measurements, breakdown and score rows."""
    started_at = time.time()
    result = run_musc_score(command, out_dir, prefect_api=prefect_api, prefect_home=prefect_home)
    run = tables.read_table(out_dir / "tables" / "runs").iloc[-1]
    result["breakdown"] = pipeline_breakdown(started_at, result["seconds"], run)
    result["parameters"] = json.loads(run["parameters"])
    rows = tables.read_table(out_dir / "tables" / "scores")[list(SCORE_COLUMNS)]
    return result, rows


def import_seconds() -> float:
    """Seconds a fresh interpreter takes to import what the engine needs (torch, open_clip, the core)."""
    code = "import torch, open_clip, musc_tasks.core, musc_tasks.backbone, musc_tasks.loading"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


@contextlib.contextmanager
def site_services(home: Path, logs: Path):
    """(Prefect API URL, Dask scheduler address) of a `prefect server start` and a 2-worker Dask cluster.

    Started as a site starts them, each its own process from the shell's commands, before the
    block; stopped after it. The server's database is in ``home``.
    """
    bin_dir = Path(sys.executable).parent
    env = offline_env(PREFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    port = free_port()
    scheduler_file = logs / "scheduler.json"
    commands = {
        "prefect-server": [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        "dask-scheduler": [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--no-dashboard"]
        + ["--scheduler-file", str(scheduler_file)],
        "dask-worker": [str(bin_dir / "dask"), "worker", "--scheduler-file", str(scheduler_file)]
        + ["--nworkers", "2", "--nthreads", "1", "--no-dashboard", "--preload", "musc_tasks.worker_imports"],
    }
    processes = []
    try:
        for name, command in commands.items():
            with open(logs / f"{name}.log", "w") as log:
                processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
            if name == "dask-scheduler":
                wait_until(scheduler_file.exists, "the Dask scheduler", processes)
        api = f"http://127.0.0.1:{port}/api"
        wait_until(lambda: healthy(api), "the Prefect server", processes)
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=120) as client:
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, "two Dask workers", processes)
        yield api, address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(ready, what: str, processes: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        exited = [p.args[1] for p in processes if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start ({'exited: ' + ', '.join(exited) if exited else 'timed out'})")
        time.sleep(0.2)


def make_input(root: Path, args: argparse.Namespace) -> tuple[Path, int]:
    """The night's folder (one subfolder per product) and its bytes."""
    products = PRODUCTS[: args.products]
    n = args.images_per_product
    if args.resolution:
        width, height = (int(v) for v in args.resolution.lower().split("x"))
        return make_night(root, n, width, height, seed=n, products=products)
    day = make_demo_day(root, seed=n, images_per_product=n, defects_per_product=max(1, n // 10))
    for other in set(PRODUCTS) - set(products):
        for path in sorted((day.input_dir / other).iterdir()):
            path.unlink()
        (day.input_dir / other).rmdir()
    return day.input_dir, sum(p.stat().st_size for p in day.input_dir.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], usage="%(prog)s [options] [-- musc score options]"
    )
    parser.add_argument("--products", type=int, default=3, choices=range(1, len(PRODUCTS) + 1))
    parser.add_argument("--images-per-product", type=int, default=30)
    parser.add_argument("--resolution", help="WIDTHxHEIGHT JPEG captures (default: the demo's 224 px PNG photos)")
    parser.add_argument("--image-size", type=int, default=224, help="side the tiny ViT squashes images to")
    parser.add_argument("--backbone", help="a backbone name as musc score takes it (default: the tiny random ViT)")
    parser.add_argument("--preset", help="a musc preset (needs its weights)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=1, help="pipeline and engine, alternating")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--site", action="store_true", help="against one running Prefect server and Dask cluster")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    # The pipeline's output shows the random-weights warning; the engine's copy would only repeat it.
    warnings.filterwarnings("ignore", message=".*RANDOM weights")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's root-logger line about the same
    load_before = os.getloadavg()

    pipeline_runs, engine_runs, checks = [], [], []
    with tempfile.TemporaryDirectory(prefix="musc-whole-run-") as tmp, contextlib.ExitStack() as services:
        input_dir, input_bytes = make_input(Path(tmp), args)
        n_images = sum(1 for p in input_dir.rglob("*") if p.is_file())
        prefect_home = Path(tmp) / "prefect-home"
        prefect_home.mkdir()
        api, address = services.enter_context(site_services(prefect_home, Path(tmp))) if args.site else (None, None)

        def command(out_dir: Path) -> list[str]:
            return score_command(input_dir, out_dir, args) + extra + (["--dask-address", address] if address else [])

        parsed = build_parser().parse_args(command(Path(tmp) / "out")[1:])  # what `musc score` will run with
        spec, scoring = backbone_from_args(parsed), scoring_from_args(parsed)
        imports = import_seconds()
        expected = {"backbone": spec.model_dump(mode="json"), "scoring": scoring.model_dump(mode="json")}
        # The first run creates the home's database (or, with --site, finds the workers cold);
        # the repeats find it, as every later night does.
        out_dir = Path(tmp) / "out-first"
        first, first_rows = run_pipeline(command(out_dir), out_dir, prefect_home, api)
        for repeat in range(args.repeats):
            out_dir = Path(tmp) / f"out-{repeat}"
            result, rows = run_pipeline(command(out_dir), out_dir, prefect_home, api)
            engine = run_engine(input_dir, spec, scoring, parsed.device)
            checks.append(score_differences(rows, engine))
            pipeline_runs.append(result)
            engine_runs.append(engine)
        checks.append(score_differences(first_rows, engine_runs[0]))
        for result in (first, *pipeline_runs):
            if result["parameters"] != expected:
                raise SystemExit(f"the pipeline ran with other parameters than the engine: {result['parameters']}")

    report = summarise(pipeline_runs, engine_runs, checks)
    report["first_run_s"] = first["seconds"]
    report["first_run_breakdown_s"] = first["breakdown"]
    report["first_run_ratio"] = first["seconds"] / report["engine_s"]
    report["site"] = args.site
    report["ratio_vs_script"] = report["pipeline_s"] / (report["engine_s"] + imports)
    print(
        f"{n_images} images ({args.products} x {args.images_per_product} per product, "
        f"{args.resolution or 'demo 224 px'}, {input_bytes / 2**20:.1f} MiB), {spec.name} at {spec.image_size} px "
        f"on {parsed.device}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"load average before {' '.join(f'{v:.1f}' for v in load_before)}, after "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}"
        + ("; against a running Prefect server and a 2-worker Dask cluster (--site)" if args.site else "")
    )
    print_report(report, imports)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "images": n_images,
            "products": args.products,
            "resolution": args.resolution,
            "input_bytes": input_bytes,
            "backbone": spec.model_dump(mode="json"),
            "scoring": scoring.model_dump(mode="json"),
            "import_seconds": imports,
            "load_before": load_before,
            **report,
            "pipeline_runs": [{k: v for k, v in r.items() if k != "parameters"} for r in pipeline_runs],
            "first_run": {k: v for k, v in first.items() if k != "parameters"},
            "engine_runs": [asdict(e) | {"scores": len(e.scores)} for e in engine_runs],
            "score_checks": checks,
        }
        args.json.write_text(json.dumps(summary, indent=2, default=str))


def summarise(pipeline_runs: list[dict], engine_runs: list[EngineRun], checks: list[dict]) -> dict:
    """Medians over the repeats and the ratios of the medians."""
    wall = statistics.median(r["seconds"] for r in pipeline_runs)
    without_publish = statistics.median(r["seconds"] - r["seconds_publish"] for r in pipeline_runs)
    work = statistics.median(sum(r[f"seconds_{s}"] for s in WORK_STAGES) for r in pipeline_runs)
    engine = statistics.median(e.total for e in engine_runs)
    engine_work = statistics.median(e.total - e.seconds["list"] for e in engine_runs)
    return {
        "pipeline_s": wall,
        "pipeline_without_publish_s": without_publish,
        "pipeline_work_stages_s": work,
        "engine_s": engine,
        "ratio": wall / engine,
        "ratio_without_publish": without_publish / engine,
        "ratio_work_stages": work / engine_work,
        "pipeline_breakdown_s": {
            part: statistics.median(r["breakdown"][part] for r in pipeline_runs)
            for part in pipeline_runs[0]["breakdown"]
        },
        "engine_breakdown_s": {part: statistics.median(e.seconds[part] for e in engine_runs) for part in ENGINE_PARTS},
        "pipeline_repeats_s": [r["seconds"] for r in pipeline_runs],
        "engine_repeats_s": [e.total for e in engine_runs],
        "max_abs_diff_score": max(c["max_abs_diff_score"] for c in checks),
        "max_abs_diff_raw": max(c["max_abs_diff_raw"] for c in checks),
        "max_abs_diff_threshold": max(c["max_abs_diff_threshold"] for c in checks),
    }


def print_report(report: dict, imports: float) -> None:
    print()
    services = "a running server and cluster, workers warm" if report["site"] else "Prefect database there"
    print(f"| pipeline (`musc score`, {services}) | s | engine (one process, in memory) | s |")
    print("| --- | --- | --- | --- |")
    left = list(report["pipeline_breakdown_s"].items())
    right = list(report["engine_breakdown_s"].items())
    for k in range(max(len(left), len(right))):
        a = f"| {left[k][0]} | {left[k][1]:.2f} " if k < len(left) else "| | "
        b = f"| {right[k][0]} | {right[k][1]:.2f} |" if k < len(right) else "| | |"
        print(a + b)
    print(f"| **whole run (wall)** | **{report['pipeline_s']:.2f}** | **engine** | **{report['engine_s']:.2f}** |")
    print()
    print(f"repeats, pipeline s: {' '.join(f'{s:.2f}' for s in report['pipeline_repeats_s'])}")
    print(f"repeats, engine s:   {' '.join(f'{s:.2f}' for s in report['engine_repeats_s'])}")
    print(f"a fresh interpreter's imports of torch, open_clip and the core (not in the engine's time): {imports:.2f} s")
    first = report["first_run_breakdown_s"]
    first_run = (
        "first run, cold workers (each loads the backbone with its first block; not in the medians)"
        if report["site"]
        else "first run, fresh PREFECT_HOME (Prefect creates and migrates its database; once per home, not in the "
        "medians)"
    )
    print(
        f"{first_run}: {report['first_run_s']:.2f} s, {report['first_run_ratio']:.2f}x the engine; start-up "
        f"{first['start-up']:.2f} s against {report['pipeline_breakdown_s']['start-up']:.2f} s in the repeats; "
        f"extract {first['extract']:.2f} s against {report['pipeline_breakdown_s']['extract']:.2f} s"
    )
    print()
    print(f"pipeline / engine, whole run:                  {report['ratio']:.2f}x")
    print(f"pipeline / engine, whole run without publish:  {report['ratio_without_publish']:.2f}x")
    print(f"pipeline / engine, extract + score + rescore:  {report['ratio_work_stages']:.2f}x (engine without listing)")
    print(f"pipeline / engine as a script (with its imports): {report['ratio_vs_script']:.2f}x")
    print(
        f"scores equal: max |final difference| {report['max_abs_diff_score']:.2g}, "
        f"max |raw difference| {report['max_abs_diff_raw']:.2g}, "
        f"max |threshold difference| {report['max_abs_diff_threshold']:.2g} (tolerance {TOLERANCE:g})"
    )


if __name__ == "__main__":
    main()
