"""The morning report: one static HTML page per day, rebuilt from the results folder alone.

Layout under a results root ``OUT``::

    OUT/reports/index.html                      one line per day, newest first
    OUT/reports/style.css
    OUT/reports/<date>/index.html               the day: a section per product
    OUT/reports/<date>/summary.json             the day's headline, read by the days index
    OUT/reports/<date>/assets/                  thumbnails (JPEG) and charts (SVG)

Everything comes from ``OUT``: the Parquet tables (scores, regions, runs), the heatmaps and the
region crops (a flagged part's card shows its strongest regions' crops, shrunk).
The captures themselves are only read for their thumbnails; a thumbnail already written is
kept (it is named by the image's content hash), and a capture no longer on disk is shown by
its heatmap alone. Links are relative and nothing is fetched from the network, so the folder
can be opened from a file share or served by any web server. Pages contain no JavaScript.

The same tables give the same bytes: no build time is written, charts carry no date, and
asset names depend only on their content's identity.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from datetime import date
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import jinja2
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from . import tables
from .atomic import write_atomic
from .identity import params_key
from .imageio import ImageReadError, bounded_size, read_rgb_reduced
from .layout import reports_dir
from .locks import exclusive_lock
from .render import BOX_RGB, crop_box, heatmap_legend

__all__ = [
    "TREND_NIGHTS",
    "build_day_report",
    "build_days_index",
    "gallery_rows",
    "histogram_svg",
    "nightly_trend",
    "out_relative",
    "thumbnail",
    "trend_svg",
]

logger = logging.getLogger(__name__)

# Nights in the trend chart, the report's own night included.
TREND_NIGHTS = 30
# Parts shown in a product's gallery: every flagged one and the top-ranked few, up to a cap.
GALLERY_TOP = 8
GALLERY_MAX = 60
# Longest side of a gallery thumbnail and its JPEG quality: about 10-30 KB each.
THUMB_SIDE = 320
JPEG_QUALITY = 82
# Region boxes drawn on an overlay, strongest first.
BOXES_DRAWN = 10
# Region crops shown in a flagged part's card, strongest first, and their thumbnails' longest side
# (the regions list links every listed region's crop at full resolution).
CROPS_SHOWN = 4
CROP_THUMB_SIDE = 160
# Okabe-Ito colours: told apart with any of the common colour-vision deficiencies.
BLUE, VERMILLION, BLACK = "#0072B2", "#D55E00", "#000000"

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("musc_tasks", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_STYLE = Path(__file__).parent / "templates" / "style.css"
# SVG charts without timestamps or random ids, text kept as text (smaller, selectable).
_SVG_RC = {"svg.hashsalt": "musc-report", "svg.fonttype": "none", "font.size": 9}


# ---------------------------------------------------------------- pure parts: tables to views


def nightly_trend(scores: pd.DataFrame, run_date: str, nights: int = TREND_NIGHTS) -> pd.DataFrame:
    """Flag rate and median score of the last nights of one product and backbone.

    Parameters
    ----------
    scores : DataFrame
        Rows of the scores table for one product and backbone, any dates, with ``date``,
        ``status``, ``score`` and ``flagged``.
    run_date : str
        ISO date of the report; later nights are left out.
    nights : int
        Most nights kept, the latest ones.

    Returns
    -------
    trend : DataFrame
        One row per night with scored images, oldest first: ``date``, ``images`` (scored),
        ``flagged``, ``flag_rate`` (in [0, 1]) and ``median_score``.
    """
    scored = scores[(scores["status"] == "scored") & (scores["date"] <= run_date)]
    if scored.empty:
        return pd.DataFrame({"date": [], "images": [], "flagged": [], "flag_rate": [], "median_score": []})
    grouped = scored.groupby("date", sort=True)
    trend = pd.DataFrame(
        {
            "images": grouped.size(),
            "flagged": grouped["flagged"].sum().astype(int),
            "median_score": grouped["score"].median(),
        }
    ).reset_index()
    trend["flag_rate"] = trend["flagged"] / trend["images"]
    trend["date"] = pd.to_datetime(trend["date"]).dt.strftime("%Y-%m-%d")  # the tables' dates, as labels
    return trend.tail(nights).reset_index(drop=True)[["date", "images", "flagged", "flag_rate", "median_score"]]


def gallery_rows(scores: pd.DataFrame, top: int = GALLERY_TOP, limit: int = GALLERY_MAX) -> pd.DataFrame:
    """The parts a person should look at: every flagged one and the ``top`` ranked, by rank.

    Parameters
    ----------
    scores : DataFrame
        One night's rows of one product and backbone.
    top, limit : int
        Unflagged parts ranked ``<= top`` are shown too; at most ``limit`` rows in all.

    Returns
    -------
    rows : DataFrame
        Scored rows, ordered by rank then path (duplicates share a rank).
    """
    scored = scores[scores["status"] == "scored"]
    chosen = scored[scored["flagged"].astype(bool) | (scored["rank"] <= top)]
    return chosen.sort_values(["rank", "path"]).head(limit).reset_index(drop=True)


def thumbnail(image: Image.Image, side: int = THUMB_SIDE) -> np.ndarray:
    """An RGB image shrunk (never enlarged) so its longer side is at most ``side``.

    Parameters
    ----------
    image : (H, W) RGB PIL image
        Resized by PIL directly, so a large capture is never copied into an array.
    side : int

    Returns
    -------
    small : (h, w, 3) uint8 array
        ``max(h, w) == min(side, max(H, W))``, aspect ratio kept, antialiased.
    """
    scale = min(1.0, side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: a fast box reduction first, Lanczos for the last factor of 3 (same look).
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0) if scale < 1 else image)


def draw_boxes(pixels: np.ndarray, boxes: list[tuple[int, int, int, int]], scale: float) -> np.ndarray:
    """Region boxes drawn around the regions in ``render.BOX_RGB`` edged with black.

    Parameters
    ----------
    pixels : (h, w, 3) uint8 array
    boxes : list of (x0, y0, x1, y1)
        Original-image pixels, x1 and y1 exclusive.
    scale : float
        Thumbnail pixels per original pixel.

    Returns
    -------
    drawn : (h, w, 3) uint8 array
    """
    image = Image.fromarray(np.ascontiguousarray(pixels))
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in boxes:
        left, top = round(x0 * scale), round(y0 * scale)
        right, bottom = max(left, round(x1 * scale) - 1), max(top, round(y1 * scale) - 1)
        # Outside the region, so the defect itself stays visible: 2 px in the heatmaps' box
        # colour, then 1 px black so the box shows on light and dark parts alike.
        draw.rectangle([left - 3, top - 3, right + 3, bottom + 3], outline=(0, 0, 0), width=1)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], outline=BOX_RGB, width=2)
    return np.asarray(image)


def histogram_svg(scores: np.ndarray, threshold: float | None, product: str) -> bytes:
    """The night's score histogram with the image threshold as a labelled dashed line.

    Parameters
    ----------
    scores : (N,) float array
    threshold : float or None
    product : str
        For the title.

    Returns
    -------
    svg : bytes
    """
    with matplotlib.rc_context(_SVG_RC):
        figure = Figure(figsize=(4.6, 2.6))
        axes = figure.add_subplot()
        scores = np.asarray(scores, dtype=np.float64)
        bins = np.histogram_bin_edges(scores, bins=min(30, max(5, scores.size // 3)))
        below = scores if threshold is None else scores[scores <= threshold]
        axes.hist(below, bins=bins, color=BLUE, label="not flagged")
        if threshold is not None:
            axes.hist(scores[scores > threshold], bins=bins, color=VERMILLION, hatch="///", label="flagged")
            axes.axvline(threshold, color=BLACK, linestyle="--", linewidth=1.2, label=f"threshold {threshold:.4g}")
        axes.set_xlabel("anomaly score")
        axes.set_ylabel("images")
        axes.set_title(f"{product}: scores of the night")
        axes.legend(frameon=False)
        axes.spines[["top", "right"]].set_visible(False)
        figure.tight_layout()
        return _svg(figure)


def trend_svg(trend: pd.DataFrame, product: str) -> bytes:
    """Flag rate and median score of the last nights, the report's night marked.

    Parameters
    ----------
    trend : DataFrame
        From ``nightly_trend``.
    product : str

    Returns
    -------
    svg : bytes
    """
    with matplotlib.rc_context(_SVG_RC):
        figure = Figure(figsize=(4.6, 3.2))
        rate_axes, median_axes = figure.subplots(2, 1, sharex=True)
        x = np.arange(len(trend))
        rate_axes.plot(x, 100 * trend["flag_rate"], color=VERMILLION, marker="o", markersize=3)
        rate_axes.set_ylabel("flagged %")
        rate_axes.set_ylim(bottom=0, top=max(1.0, 110 * float(trend["flag_rate"].max() if len(trend) else 0)))
        rate_axes.set_title(f"{product}: last {len(trend)} night(s)")
        median_axes.plot(x, trend["median_score"], color=BLUE, marker="s", markersize=3)
        median_axes.set_ylabel("median score")
        for axes in (rate_axes, median_axes):
            axes.spines[["top", "right"]].set_visible(False)
            if len(trend):
                axes.axvline(x[-1], color=BLACK, linewidth=0.6, linestyle=":")
        step = max(1, len(trend) // 6)
        ticks = list(x[::-step][::-1])
        median_axes.set_xticks(ticks, [trend["date"].iloc[i][5:] for i in ticks])
        median_axes.set_xlabel("night (month-day); dotted: this report")
        figure.tight_layout()
        return _svg(figure)


def _svg(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasSVG(figure).print_svg(buffer, metadata={"Date": None, "Creator": None})
    return buffer.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def _text(value) -> str:
    """A nullable string column's value for display (pandas reads nulls as None or NaN)."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _number(value) -> float | None:
    """A nullable float column's value (None for null or NaN: nights published before it existed)."""
    return None if value is None or pd.isna(value) else float(value)


def _slug(name: str) -> str:
    """A file-name and anchor-safe key for a product, unique through its hash suffix."""
    cleaned = "".join(c if c.isascii() and c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"{cleaned[:40] or 'product'}-{params_key(name, length=8)}"


def out_relative(stored: str, out_dir: Path, kind: str, run_date: str) -> str:
    """A ``mask_path`` or ``heatmap_path`` of the tables as a path inside OUT.

    The tables hold absolute paths; an OUT copied or moved elsewhere still finds its own
    files from the layout's ``<kind>/<date>/`` folder on, and tables written before paths
    were absolute hold the relative path already.
    """
    path = PurePosixPath(stored)
    if not path.is_absolute():
        return stored
    if path.is_relative_to(out_dir.resolve().as_posix()):
        return path.relative_to(out_dir.resolve().as_posix()).as_posix()
    parts = path.parts
    for index in range(len(parts) - 1):
        if parts[index : index + 2] == (kind, run_date):
            return PurePosixPath(*parts[index:]).as_posix()
    raise ValueError(f"{stored} is not a {kind} file of {run_date} under an OUT")


def _href(relpath: str) -> str:
    """A relative URL: every path segment percent-encoded, so spaces and '#' survive."""
    return quote(relpath, safe="/")


# ---------------------------------------------------------------- shell: OUT to files


@dataclass(frozen=True)
class DayReport:
    path: Path
    backbone_key: str
    summary: dict


def build_day_report(out_dir: Path, run_date: str, backbone_key: str | None = None) -> DayReport:
    """Write ``OUT/reports/<date>/`` for one backbone's results, then the days index.

    Holds ``OUT/locks/reports.lock`` while it writes.

    Parameters
    ----------
    out_dir : Path
        The results folder.
    run_date : str
        ISO date of the night.
    backbone_key : str, optional
        Whose results to show; default: the backbone of the night's latest run.

    Returns
    -------
    report : DayReport
        Its ``index.html`` path, the backbone shown and the headline numbers.
    """
    out_dir = Path(out_dir)
    try:
        run_date = date.fromisoformat(run_date).isoformat()  # also keeps the folder inside OUT
    except ValueError:
        raise ValueError(f"the night must be a date YYYY-MM-DD, got {run_date!r}") from None
    # One writer of OUT/reports at a time: runs of two backbones (or two dates) finishing together
    # would otherwise remove each other's assets or drop a night from the index.
    waiting = f"another run is writing a report in {reports_dir(out_dir)}; waiting for it"
    with exclusive_lock(out_dir / "locks" / "reports.lock", waiting_message=waiting):
        return _build_day_report(out_dir, run_date, backbone_key)


def _build_day_report(out_dir: Path, run_date: str, backbone_key: str | None) -> DayReport:
    scores = tables.read_table(out_dir / "tables" / "scores", filters=[("date", "<=", run_date)])
    runs = tables.read_table(out_dir / "tables" / "runs", filters=[("date", "=", run_date)])
    night = scores[scores["date"] == run_date]
    if night.empty:
        raise ValueError(f"no results for {run_date} in {out_dir / 'tables' / 'scores'}")
    backbones = sorted(night["backbone_key"].unique())
    if backbone_key is None:
        latest = runs[runs["backbone_key"].isin(backbones)].sort_values("finished_at")
        backbone_key = latest["backbone_key"].iloc[-1] if len(latest) else backbones[0]
    elif backbone_key not in backbones:
        raise ValueError(f"no results of backbone {backbone_key!r} on {run_date}; there are {backbones}")
    scores = scores[scores["backbone_key"] == backbone_key]
    night = night[night["backbone_key"] == backbone_key]
    regions = tables.read_table(out_dir / "tables" / "regions", filters=[("date", "=", run_date)])
    regions = regions[regions["backbone_key"] == backbone_key]
    signals = tables.read_table(out_dir / "tables" / "days", filters=[("date", "=", run_date)])
    signals = signals[signals["backbone_key"] == backbone_key].set_index("product")

    day_dir = reports_dir(out_dir) / run_date
    assets = day_dir / "assets"
    products = [
        {
            **_product_view(out_dir, day_dir, name, group, scores[scores["product"] == name], regions, run_date),
            "repeated_defect": _repeated_defect_check(signals, name),
        }
        for name, group in sorted(night.groupby("product"), key=lambda item: item[0])
    ]
    summary = {
        "date": run_date,
        "backbone_key": backbone_key,
        "products": len(products),
        "images": int(len(night)),
        "scored": int((night["status"] == "scored").sum()),
        "flagged": int(night["flagged"].fillna(False).astype(bool).sum()),
        "failed": int((night["status"] == "failed").sum()),
        "not_scored": int((night["status"] == "not_scored").sum()),
        "worst": [p["name"] for p in sorted(products, key=lambda p: -p["flag_rate"]) if p["flagged"]][:3],
    }
    html = _TEMPLATES.get_template("day.html.j2").render(
        summary=summary,
        products=products,
        run=_run_facts(runs[runs["backbone_key"] == backbone_key]),
        other_backbones=[key for key in backbones if key != backbone_key],
        trend_nights=TREND_NIGHTS,
    )
    _remove_unused(assets, html)
    _write_if_changed(day_dir / "summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    path = _write_if_changed(day_dir / "index.html", html.encode())
    build_days_index(out_dir)
    logger.info("report for %s: %s", run_date, path)
    return DayReport(path=path, backbone_key=backbone_key, summary=summary)


def _repeated_defect_check(signals: pd.DataFrame, product: str) -> dict | None:
    """The night's repeated-defect check of tables/days (only where references were used), else None."""
    if product not in signals.index or pd.isna(signals.loc[product, "reference_set"]):
        return None
    row = signals.loc[product]
    return {"suspected": bool(row["systematic_defect_suspected"]), "reason": str(row["reason"])}


def build_days_index(out_dir: Path) -> Path:
    """Write ``OUT/reports/index.html``: one line per day that has a report, newest first."""
    reports = reports_dir(out_dir)
    days = []
    for summary_path in sorted(reports.glob("*/summary.json"), reverse=True):
        summary = json.loads(summary_path.read_text())
        days.append({**summary, "href": _href(f"{summary_path.parent.name}/index.html")})
    html = _TEMPLATES.get_template("days.html.j2").render(days=days)
    _write_if_changed(reports / "style.css", _STYLE.read_bytes())
    return _write_if_changed(reports / "index.html", html.encode())


def _product_view(
    out_dir: Path,
    day_dir: Path,
    name: str,
    night: pd.DataFrame,
    history: pd.DataFrame,
    regions: pd.DataFrame,
    run_date: str,
) -> dict:
    slug = _slug(name)
    assets = day_dir / "assets" / slug
    scored = night[night["status"] == "scored"]
    thresholds = scored[["image_threshold", "pixel_threshold"]].iloc[0] if len(scored) else None
    view = {
        "name": name,
        "slug": slug,
        "images": int(len(night)),
        "scored": int(len(scored)),
        "flagged": int(scored["flagged"].astype(bool).sum()),
        "flag_rate": float(scored["flagged"].astype(bool).mean()) if len(scored) else 0.0,
        "failed": int((night["status"] == "failed").sum()),
        "image_threshold": None if thresholds is None else float(thresholds["image_threshold"]),
        "pixel_threshold": None if thresholds is None else float(thresholds["pixel_threshold"]),
        "problems": [
            {"path": row.path, "status": row.status, "reason": _text(row.error), "note": _text(row.note)}
            for row in night[night["status"] != "scored"].sort_values("path").itertuples()
        ],
        "histogram": None,
        "trend": None,
        "gallery": [],
    }
    if scored.empty:
        return view
    histogram = histogram_svg(scored["score"].to_numpy(), view["image_threshold"], name)
    view["histogram"] = _write_if_changed(assets / "scores.svg", histogram).relative_to(day_dir).as_posix()
    trend = nightly_trend(history, run_date)
    view["trend"] = _write_if_changed(assets / "trend.svg", trend_svg(trend, name)).relative_to(day_dir).as_posix()
    view["trend_rows"] = trend.to_dict("records")
    view["legend"] = None
    scale = scored[["heatmap_min", "heatmap_max"]].dropna() if "heatmap_min" in scored else scored.iloc[:0]
    if len(scale):  # nights published before heatmaps had a recorded scale have no legend
        floor, top = (float(v) for v in scale.iloc[0])
        legend = _write_if_changed(assets / "legend.png", _png(heatmap_legend(floor, top)))
        view["legend"] = legend.relative_to(day_dir).as_posix()
        view["heatmap_scale"] = (floor, top)
    chosen = gallery_rows(night)
    view["more_flagged"] = view["flagged"] - int(chosen["flagged"].astype(bool).sum())
    for row in chosen.itertuples():
        boxes = regions[(regions["image_id"] == row.image_id) & (regions["path"] == row.path)].sort_values("region")
        view["gallery"].append(_gallery_item(out_dir, day_dir, assets, row, boxes))
    return view


def _gallery_item(out_dir: Path, day_dir: Path, assets: Path, row, boxes: pd.DataFrame) -> dict:
    # Named by what they show, so a rebuild reuses them: the capture by its content hash, the
    # overlay by the run that wrote its heatmap (a re-run or another backbone gets a new one).
    heatmap_rel = out_relative(row.heatmap_path, out_dir, "heatmaps", day_dir.name)
    mask_rel = out_relative(row.mask_path, out_dir, "masks", day_dir.name)
    overlay_key = params_key([row.run_id, heatmap_rel], length=20)
    capture_file = assets / f"{row.image_id[:20]}-capture.jpg"
    overlay_file = assets / f"{overlay_key}-overlay.jpg"
    if not capture_file.exists():
        try:
            # only a thumbnail is drawn: a JPEG capture is decoded at a reduced scale
            image, _, _ = read_rgb_reduced(Path(row.path), THUMB_SIDE)
            _write_if_changed(capture_file, _jpeg(thumbnail(image)))
        except (ImageReadError, OSError) as error:
            logger.warning("report: no thumbnail of %s (%s)", row.path, getattr(error, "reason", error))
    if not overlay_file.exists():
        try:
            with Image.open(out_dir / heatmap_rel) as heatmap:
                full_width = heatmap.width
                heatmap.draft("RGB", bounded_size(heatmap.size, THUMB_SIDE))  # JPEG: a reduced decode
                small = thumbnail(heatmap.convert("RGB"))
        except OSError as error:
            logger.warning("report: no heatmap thumbnail of %s (%s)", row.path, error)
        else:
            drawn = boxes.head(BOXES_DRAWN)
            box_list = list(zip(drawn["bbox_x0"], drawn["bbox_y0"], drawn["bbox_x1"], drawn["bbox_y1"]))
            _write_if_changed(overlay_file, _jpeg(draw_boxes(small, box_list, small.shape[1] / full_width)))
    crops = _crop_thumbnails(out_dir, day_dir, assets, row, boxes.head(BOXES_DRAWN))
    capture = Path(row.path)
    inside = capture.is_absolute() and capture.resolve().is_relative_to(out_dir.resolve())
    up = "../../"  # from OUT/reports/<date>/ back to OUT
    return {
        "rank": int(row.rank),
        "score": float(row.score),
        "flagged": bool(row.flagged),
        "margin": _number(getattr(row, "margin", None)),
        "peak_rule": bool((boxes["region_rule"] == "peak").any()) if "region_rule" in boxes else False,
        "path": row.path,
        "note": _text(row.note),
        "capture": capture_file.relative_to(day_dir).as_posix() if capture_file.exists() else None,
        "overlay": overlay_file.relative_to(day_dir).as_posix() if overlay_file.exists() else None,
        "heatmap_href": up + _href(heatmap_rel),
        "mask_href": up + _href(mask_rel),
        "capture_href": up + _href(capture.resolve().relative_to(out_dir.resolve()).as_posix()) if inside else None,
        "width": int(row.width),
        "height": int(row.height),
        "anomalous_percent": 100.0 * float(row.anomalous_fraction),
        "regions": [
            {
                "x0": r.bbox_x0,
                "y0": r.bbox_y0,
                "x1": r.bbox_x1,
                "y1": r.bbox_y1,
                "area": r.area_px,
                "max": r.max_score,
                "crop_href": crop["href"] if crop else None,
            }
            for r, crop in zip(boxes.head(BOXES_DRAWN).itertuples(), crops)
        ],
        "crops": [crop for crop in crops[:CROPS_SHOWN] if crop and crop["thumbnail"]],
        "n_regions": len(boxes),
    }


def _crop_thumbnails(out_dir: Path, day_dir: Path, assets: Path, row, boxes: pd.DataFrame) -> list[dict | None]:
    """Each region's crop link, and for the first ``CROPS_SHOWN`` a thumbnail with the region boxed.

    None for a region without a crop (nights published before crops). A thumbnail is named by
    the run and the crop's path, like the overlay, and kept on rebuilds.
    """
    crops: list[dict | None] = []
    for index, region in enumerate(boxes.itertuples()):
        stored = _text(getattr(region, "crop_path", None))
        if not stored:
            crops.append(None)
            continue
        crop_rel = out_relative(stored, out_dir, "crops", day_dir.name)
        crop = {"region": int(region.region), "href": "../../" + _href(crop_rel), "thumbnail": None}
        crops.append(crop)
        if index >= CROPS_SHOWN:
            continue
        thumb_file = assets / f"{params_key([row.run_id, crop_rel], length=20)}-crop.jpg"
        if not thumb_file.exists():
            bbox = (region.bbox_x0, region.bbox_y0, region.bbox_x1, region.bbox_y1)
            left, top, right, bottom = crop_box(bbox, (int(row.width), int(row.height)))
            try:
                with Image.open(out_dir / crop_rel) as image:
                    small = thumbnail(image.convert("RGB"), CROP_THUMB_SIDE)
                    same_box = image.size == (right - left, bottom - top)
            except OSError as error:
                logger.warning("report: no thumbnail of crop %s (%s)", crop_rel, error)
                continue
            # the region boxed where the crop is the one crop_box gives (so its place in the crop is known)
            boxed = [(bbox[0] - left, bbox[1] - top, bbox[2] - left, bbox[3] - top)] if same_box else []
            _write_if_changed(thumb_file, _jpeg(draw_boxes(small, boxed, small.shape[1] / (right - left))))
        crop["thumbnail"] = thumb_file.relative_to(day_dir).as_posix()
    return crops


def _run_facts(runs: pd.DataFrame) -> dict | None:
    if runs.empty:
        return None
    latest = runs.sort_values("finished_at").iloc[-1]
    parameters = json.loads(latest["parameters"])
    return {
        "run_id": latest["run_id"],
        "flow_run_id": latest["flow_run_id"],
        "runs_that_day": len(runs),
        "started_at": latest["started_at"].strftime("%Y-%m-%d %H:%M:%S %Z"),
        "finished_at": latest["finished_at"].strftime("%Y-%m-%d %H:%M:%S %Z"),
        "input_dir": latest["input_dir"],
        "backbone": parameters.get("backbone", {}),
        "scoring": parameters.get("scoring", {}),
        # Every run so far scores each image against the night's other images only.
        "reference_mode": parameters.get("scoring", {}).get("reference_mode", "zero-shot (the night's own images)"),
        "seconds": {
            column.removeprefix("seconds_"): float(latest[column])
            for column in runs.columns
            if column.startswith("seconds_")
        },
        "cache": {
            "tokens extracted": int(latest["images_extracted"]),
            "tokens from cache": int(latest["images_token_cached"]),
            "block pairs computed": int(latest["pairs_computed"]),
            "block pairs from cache": int(latest["pairs_cached"]),
        },
        "versions": json.loads(latest["versions"]),
    }


def _remove_unused(assets: Path, html: str) -> None:
    """Delete assets the page no longer shows (parts of an earlier run, a removed product)."""
    for path in sorted(assets.rglob("*"), reverse=True):
        if path.is_file() and _href(path.relative_to(assets.parent).as_posix()) not in html:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _write_if_changed(path: Path, data: bytes) -> Path:
    """Atomic write, skipped when the file already holds these bytes (rebuilds touch nothing)."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    return write_atomic(path, data)
