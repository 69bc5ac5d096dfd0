"""Parquet result tables: explicit schemas and atomic hive-partition publishing.

Layout under a results root ``OUT``::

    OUT/tables/scores/date=2026-11-22/product=bottle/<stem>.parquet
    OUT/tables/regions/date=2026-11-22/product=bottle/<stem>.parquet
    OUT/tables/runs/date=2026-11-22/<stem>.parquet
    OUT/tables/metrics/dataset=mvtec_ad/<stem>.parquet

``stem`` is normally a backbone key, so results of two backbones for the same partition
coexist as two files, and a re-run of the same partition and backbone replaces its file.
Partition columns live only in the directory names, never inside the files.

Partition values (and stems) are percent-encoded: every byte of the UTF-8 encoding outside
``[A-Za-z0-9._-]`` becomes ``%XX``. This is the URI segment encoding that pyarrow
(``segment_encoding="uri"``, the default for hive partitioning), DuckDB
(``hive_partitioning=true``) and Spark decode, so ``product=screw%20bolt`` reads back as
``"screw bolt"`` and ``product=cap%232`` as ``"cap#2"``. It escapes a superset of what Spark
escapes when it writes, which is harmless because decoding is the same.

Every path in the tables is absolute (``path``, ``mask_path``, ``heatmap_path``,
``crop_path``, ``input_dir``): what a query returns opens as it is, on any machine that
mounts OUT and the input at the same paths.

Partition columns have one type in every reader: ``date`` is a date (Arrow ``date32``,
DuckDB ``DATE``, pandas ``datetime64``), every other key a string. Left to infer, pandas reads
``date=2026-11-22`` as an unordered categorical (no date ranges) and DuckDB would turn a
product named ``2024`` into a number; ``partitioning`` and ``duckdb_hive_types`` say it.

Writers put the file aside as ``.<stem>.parquet.<pid>-<random>.tmp`` (pyarrow and Spark skip
names starting with ``"."``; DuckDB's ``*.parquet`` glob does match dot-files, so the ``.tmp``
suffix is what hides it there), fsync it, ``os.replace`` it onto the final name and fsync the
directory, so a reader sees the old file or the new one, never a partial one. The bytes
depend only on the rows and the pyarrow version: pyarrow writes no timestamps, only
``created_by`` (its version) and the Arrow schema, so identical rows give an identical file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .atomic import write_atomic
from .identity import path_segment

__all__ = [
    "SCORES_SCHEMA",
    "REGIONS_SCHEMA",
    "RUNS_SCHEMA",
    "DAYS_SCHEMA",
    "METRICS_SCHEMA",
    "TABLES",
    "SCORE_STATUSES",
    "PARTITION_TYPES",
    "partition_path",
    "partition_keys",
    "partitioning",
    "duckdb_hive_types",
    "empty_table",
    "to_table",
    "publish_partition",
    "remove_stale",
    "read_table",
]

logger = logging.getLogger(__name__)

SCORE_STATUSES = ("scored", "failed", "not_scored")

# Fixed so that the file layout does not depend on the writer's defaults or on table size.
ROW_GROUP_ROWS = 65_536
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3


def _required(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _optional(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


SCORES_SCHEMA = pa.schema(
    [
        _required("image_id", pa.string()),  # sha256 hex of the file content
        _required("path", pa.string()),
        _optional("width", pa.int32()),
        _optional("height", pa.int32()),
        _optional("score", pa.float64()),  # final RsCIN score
        _optional("raw_score", pa.float64()),
        _optional("rank", pa.int32()),  # 1 = most anomalous within product and date
        _optional("flagged", pa.bool_()),
        _optional("margin", pa.float64()),  # (score - image_threshold) / robust sd of the scores; > 0 iff flagged
        _optional("image_threshold", pa.float64()),
        _optional("pixel_threshold", pa.float64()),
        _optional("pool_index", pa.int32()),
        _optional("pool_images", pa.int32()),
        _optional("anomalous_fraction", pa.float64()),  # of the image's pixels in its mask
        _optional("mask_level", pa.float64()),  # mask = map > mask_level (render.image_mask); null: not flagged
        _optional("mask_path", pa.string()),  # absolute, like every path column
        _optional("heatmap_path", pa.string()),  # absolute
        _optional("heatmap_min", pa.float64()),  # score at the colour ramp's start (uncoloured at or below)
        _optional("heatmap_max", pa.float64()),  # score at the colour ramp's end (the product's maximum)
        _required("backbone_key", pa.string()),
        _required("run_id", pa.string()),
        _required("status", pa.string()),  # one of SCORE_STATUSES
        _optional("error", pa.string()),
        _optional("note", pa.string()),
        _optional("reference_set", pa.string()),  # name@vN:content of the known-good set used, or null
        _optional("reference_mode", pa.string()),  # few-shot | plus | combined, or null (zero-shot)
    ]
)

REGIONS_SCHEMA = pa.schema(
    [
        _required("image_id", pa.string()),
        _required("path", pa.string()),
        _required("region", pa.int32()),  # 1-based within the image
        # Original-image pixels; x1 and y1 are exclusive.
        _required("bbox_x0", pa.int32()),
        _required("bbox_y0", pa.int32()),
        _required("bbox_x1", pa.int32()),
        _required("bbox_y1", pa.int32()),
        _required("area_px", pa.int64()),
        _required("area_fraction", pa.float64()),
        _required("max_score", pa.float64()),
        _required("mean_score", pa.float64()),
        _required("centroid_x", pa.float64()),
        _required("centroid_y", pa.float64()),
        _optional("region_rule", pa.string()),  # pixel_threshold | peak (render.MASK_RULES)
        _required("backbone_key", pa.string()),
        _required("run_id", pa.string()),
        # Absolute path of the region's JPEG crop of the capture; null in nights published before crops.
        _optional("crop_path", pa.string()),
    ]
)

_UTC_MICROS = pa.timestamp("us", tz="UTC")

RUNS_SCHEMA = pa.schema(
    [
        _required("run_id", pa.string()),
        _optional("flow_run_id", pa.string()),
        _required("started_at", _UTC_MICROS),
        _required("finished_at", _UTC_MICROS),
        _required("backbone_key", pa.string()),
        _required("parameters", pa.string()),  # JSON
        _required("versions", pa.string()),  # JSON of package versions
        _required("input_dir", pa.string()),
        _required("n_images", pa.int32()),
        _required("n_scored", pa.int32()),
        _required("n_flagged", pa.int32()),
        _required("n_failed", pa.int32()),
        _required("seconds_catalog", pa.float64()),
        _required("seconds_extract", pa.float64()),
        _required("seconds_score", pa.float64()),
        _required("seconds_rescore", pa.float64()),
        _required("seconds_publish", pa.float64()),
        _required("images_extracted", pa.int32()),
        _required("images_token_cached", pa.int32()),
        _required("pairs_computed", pa.int32()),
        _required("pairs_cached", pa.int32()),
        _required("status", pa.string()),
        _optional("seconds_references", pa.float64()),  # scoring with known-good references; null without
    ]
)

METRICS_SCHEMA = pa.schema(
    [
        _required("category", pa.string()),
        # Pixel metrics are null for a category without ground-truth masks.
        _optional("image_auroc", pa.float64()),
        _optional("image_ap", pa.float64()),
        _optional("image_f1_max", pa.float64()),
        _optional("pixel_auroc", pa.float64()),
        _optional("pixel_ap", pa.float64()),
        _optional("pixel_f1_max", pa.float64()),
        _optional("aupro", pa.float64()),
        _optional("pro_musc", pa.float64()),
        _required("n_images", pa.int32()),
        _required("n_anomalous", pa.int32()),
        _required("backbone_key", pa.string()),
        _required("image_size", pa.int32()),
        _required("pool_size", pa.int32()),
        _required("mask_mode", pa.string()),
        _required("run_id", pa.string()),
        # few-shot evaluation (musc evaluate --references --shots K): null for zero-shot rows
        _optional("shots", pa.int32()),  # K train images drawn per category
        _optional("seed", pa.int32()),  # seed of the draw
        _optional("reference_mode", pa.string()),  # few-shot | plus | combined
        _optional("reference_set", pa.string()),  # name@vN:content of the category's references; null on mean
    ]
)

DAYS_SCHEMA = pa.schema(
    [
        _required("n_images", pa.int32()),  # distinct images scored in the product
        _optional("reference_set", pa.string()),  # name@vN:content, null without references
        _optional("reference_mode", pa.string()),
        _optional("reference_only_fraction", pa.float64()),  # images with a patch the references flag, zero-shot not
        _optional("repeated_defect_images", pa.int32()),  # the most such images at one patch location
        _optional("night_plus_auc", pa.float64()),  # P(night MuSc+ patch > references' leave-one-out one)
        _required("systematic_defect_suspected", pa.bool_()),
        _required("reason", pa.string()),
        _required("backbone_key", pa.string()),
        _required("run_id", pa.string()),
    ]
)

# Table directory name -> (schema of the file contents, partition keys in path order).
TABLES: dict[str, tuple[pa.Schema, tuple[str, ...]]] = {
    "scores": (SCORES_SCHEMA, ("date", "product")),
    "regions": (REGIONS_SCHEMA, ("date", "product")),
    "runs": (RUNS_SCHEMA, ("date",)),
    "days": (DAYS_SCHEMA, ("date", "product")),
    "metrics": (METRICS_SCHEMA, ("dataset",)),
}

# The type of a partition key other than string.
PARTITION_TYPES: dict[str, pa.DataType] = {"date": pa.date32()}


def _check_stem(stem: str) -> str:
    if not isinstance(stem, str) or not stem or stem.startswith("."):
        raise ValueError(f"stem must be a non-empty string not starting with '.', got {stem!r}")
    return path_segment(stem) + ".parquet"


def partition_path(partition: Mapping[str, str]) -> Path:
    """The relative directory of a hive partition.

    Parameters
    ----------
    partition : ordered mapping of str to str
        Partition keys in path order, e.g. ``{"date": "2026-11-22", "product": "screw bolt"}``.
        Keys are identifiers; values are non-empty and percent-encoded (module docstring).

    Returns
    -------
    path : Path
        E.g. ``date=2026-11-22/product=screw%20bolt``.
    """
    segments = []
    for key, value in partition.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"partition key must be an identifier, got {key!r}")
        if not isinstance(value, str) or not value:
            raise ValueError(f"partition value for {key!r} must be a non-empty string, got {value!r}")
        segments.append(f"{key}={path_segment(value)}")
    return Path(*segments)


def empty_table(schema: pa.Schema) -> pa.Table:
    """A zero-row table.

    Parameters
    ----------
    schema : pyarrow schema

    Returns
    -------
    table : (0 rows) pyarrow table with ``schema``
    """
    return schema.empty_table()


def _check_values(table: pa.Table, schema: pa.Schema, what: str) -> None:
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise ValueError(f"{what}: column {field.name!r} is not nullable but has nulls")
    if schema.equals(SCORES_SCHEMA):
        bad = set(table.column("status").to_pylist()) - set(SCORE_STATUSES)
        if bad:
            raise ValueError(f"{what}: column 'status' must be one of {SCORE_STATUSES}, got {sorted(bad)}")


def to_table(rows: Sequence[Mapping[str, object]], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts.

    Parameters
    ----------
    rows : sequence of mappings
        One mapping per row. A missing key is null, which only nullable columns accept;
        an unknown key raises.
    schema : pyarrow schema

    Returns
    -------
    table : (len(rows) rows) pyarrow table with ``schema``
    """
    names = set(schema.names)
    for index, row in enumerate(rows):
        unknown = set(row) - names
        if unknown:
            raise ValueError(f"rows[{index}] has unknown columns {sorted(unknown)}")
    columns = []
    for field in schema:
        try:
            columns.append(pa.array([row.get(field.name) for row in rows], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as error:
            raise ValueError(f"rows: column {field.name!r} does not fit {field.type}: {error}") from error
    table = pa.Table.from_arrays(columns, schema=schema)
    _check_values(table, schema, "rows")
    return table


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether a cast keeps meaning: pyarrow would also turn 7 into "7" or "1.5" into 1.5."""
    if pa.types.is_null(source) or source.equals(target):
        return True
    if pa.types.is_integer(target):
        # pandas holds a nullable integer column as float64 with NaN; the safe cast
        # below still rejects fractional values.
        return pa.types.is_integer(source) or pa.types.is_floating(source)
    if pa.types.is_floating(target):
        return pa.types.is_integer(source) or pa.types.is_floating(source)
    if pa.types.is_string(target):
        return pa.types.is_string(source) or pa.types.is_large_string(source)
    if pa.types.is_timestamp(target):
        # A naive timestamp would silently be read as UTC.
        return pa.types.is_timestamp(source) and source.tz is not None
    return False


def _conform(table: pa.Table | pd.DataFrame, schema: pa.Schema, what: str) -> pa.Table:
    """Cast ``table`` to ``schema``, raising ValueError on a missing, extra or mistyped column."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    missing = [name for name in schema.names if name not in table.column_names]
    extra = [name for name in table.column_names if name not in schema.names]
    if missing or extra:
        raise ValueError(f"{what}: missing columns {missing}, extra columns {extra}")
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not _castable(column.type, field.type):
            raise ValueError(f"{what}: column {field.name!r} has type {column.type}, expected {field.type}")
        try:
            columns.append(column.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
            message = f"{what}: column {field.name!r} of type {column.type} does not cast to {field.type}"
            raise ValueError(message) from error
    # Built afresh so no pandas or caller metadata reaches the file.
    conformed = pa.Table.from_arrays(columns, schema=schema)
    _check_values(conformed, schema, what)
    return conformed


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=ROW_GROUP_ROWS,
        compression=COMPRESSION,
        compression_level=COMPRESSION_LEVEL,
    )
    return sink.getvalue().to_pybytes()


def publish_partition(
    table_dir: Path,
    partition: Mapping[str, str],
    stem: str,
    table: pa.Table | pd.DataFrame,
    schema: pa.Schema,
) -> Path:
    """Atomically write (or replace) one partition file.

    Parameters
    ----------
    table_dir : Path
        The table's root, e.g. ``OUT/tables/scores``.
    partition : ordered mapping of str to str
        E.g. ``{"date": "2026-11-22", "product": "bottle"}``; see ``partition_path``.
    stem : str
        File name without ``.parquet``, normally the backbone key (percent-encoded like a
        partition value). The same partition and stem replaces the earlier file.
    table : pyarrow table or DataFrame
        Exactly the columns of ``schema`` (partition columns excluded); cast to it.
    schema : pyarrow schema
        One of the module's schemas.

    Returns
    -------
    path : Path
        The published file.
    """
    file_name = _check_stem(stem)
    what = f"table {Path(table_dir).name!r}"
    conformed = _conform(table, schema, what)
    path = Path(table_dir) / partition_path(partition) / file_name
    write_atomic(path, _parquet_bytes(conformed))
    logger.debug("published %d rows to %s", conformed.num_rows, path)
    return path


def remove_stale(
    table_dir: Path,
    partition_prefix: Mapping[str, str],
    stem: str,
    keep: Iterable[Mapping[str, str]],
) -> list[Path]:
    """Delete the stem's files under a partition prefix except in the partitions to keep.

    Used on a re-run of the same date and backbone: a product no longer in the input
    would otherwise keep its old rows. Directories left empty are removed.

    Parameters
    ----------
    table_dir : Path
        The table's root.
    partition_prefix : ordered mapping of str to str
        Leading partition keys, e.g. ``{"date": "2026-11-22"}``.
    stem : str
        As given to ``publish_partition``.
    keep : iterable of ordered mappings
        Full partitions, e.g. ``[{"date": "2026-11-22", "product": "bottle"}]``.

    Returns
    -------
    removed : list of Path
        The deleted files, sorted.
    """
    table_dir = Path(table_dir)
    file_name = _check_stem(stem)
    prefix_dir = table_dir / partition_path(partition_prefix)
    keep_dirs = {table_dir / partition_path(partition) for partition in keep}
    if not prefix_dir.is_dir():
        return []
    removed = sorted(path for path in prefix_dir.rglob(file_name) if path.parent not in keep_dirs)
    for path in removed:
        path.unlink(missing_ok=True)
        logger.info("removed stale %s", path)
        directory = path.parent
        while directory != table_dir and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
            directory = directory.parent
    return removed


def _visible_files(table_dir: Path) -> list[Path]:
    """Parquet files, skipping anything hidden ("." or "_" prefix) at any level, as pyarrow does."""
    files = []
    for root, dir_names, file_names in os.walk(table_dir):
        dir_names[:] = sorted(name for name in dir_names if not name.startswith((".", "_")))
        files.extend(
            Path(root) / name
            for name in sorted(file_names)
            if name.endswith(".parquet") and not name.startswith((".", "_"))
        )
    return files


def _partition_keys(path: Path, table_dir: Path) -> tuple[str, ...]:
    return tuple(part.split("=", 1)[0] for part in path.parent.relative_to(table_dir).parts)


def partition_keys(table_dir: Path) -> tuple[str, ...]:
    """The partition keys of a table, in path order: its files', else the known table's.

    Parameters
    ----------
    table_dir : Path
        The table's root, e.g. ``OUT/tables/scores``.

    Returns
    -------
    keys : tuple of str
        E.g. ``("date", "product")``; raises ValueError when two files disagree.
    """
    table_dir = Path(table_dir)
    files = _visible_files(table_dir) if table_dir.is_dir() else []
    if not files:
        return TABLES.get(table_dir.name, (None, ()))[1]
    keys = _partition_keys(files[0], table_dir)
    for path in files[1:]:
        if _partition_keys(path, table_dir) != keys:
            raise ValueError(f"table_dir {table_dir}: {path} has partition keys other than {keys}")
    return keys


def partitioning(keys: Sequence[str]) -> ds.Partitioning:
    """The hive partitioning of ``keys`` with their types (``date`` a date, others strings).

    Parameters
    ----------
    keys : sequence of str
        Partition keys in path order, e.g. ``("date", "product")`` (see ``partition_keys``).

    Returns
    -------
    partitioning : pyarrow.dataset.Partitioning
        For ``pyarrow.dataset.dataset`` or ``pandas.read_parquet(..., partitioning=...)``;
        values are percent-decoded.
    """
    schema = pa.schema([pa.field(key, PARTITION_TYPES.get(key, pa.string())) for key in keys])
    return ds.partitioning(schema, flavor="hive")


def duckdb_hive_types(keys: Sequence[str]) -> str:
    """DuckDB's ``hive_types`` argument for ``keys``: ``{'date': DATE, 'product': VARCHAR}``."""
    types = {"date": "DATE"}
    return "{" + ", ".join(f"'{key}': {types.get(key, 'VARCHAR')}" for key in keys) + "}"


def _date_filters(filters):
    """A list of (key, op, value) tuples with ISO strings for ``date`` turned into dates."""

    def typed(condition):
        key, op, value = condition
        if key != "date":
            return condition
        if isinstance(value, str):
            value = date.fromisoformat(value)
        elif isinstance(value, (list, tuple, set)):
            value = [date.fromisoformat(v) if isinstance(v, str) else v for v in value]
        return (key, op, value)

    return [[typed(c) for c in group] if isinstance(group, list) else typed(group) for group in filters]


def read_table(table_dir: Path, *, filters=None) -> pd.DataFrame:
    """Read a whole table with its hive partition columns.

    Parameters
    ----------
    table_dir : Path
        The table's root, e.g. ``OUT/tables/scores``. When its name is a key of ``TABLES``
        that schema is used (older files missing a column read as null); otherwise the
        schema comes from the files.
    filters : pyarrow expression or list of tuples, optional
        As in ``pyarrow.parquet.read_table``, e.g. ``[("product", "=", "screw bolt")]``.
        ``date`` compares as a date: give a ``datetime.date`` or an ISO string.

    Returns
    -------
    frame : DataFrame
        The file columns followed by the partition columns: ``date`` as ``datetime64`` (so
        ``frame["date"] >= "2026-11-01"`` and ``.dt`` work), the others as decoded strings.
        Empty with the same columns when nothing is published (only when the table name is known).
    """
    table_dir = Path(table_dir)
    schema = TABLES.get(table_dir.name, (None, ()))[0]
    keys = partition_keys(table_dir)
    files = _visible_files(table_dir) if table_dir.is_dir() else []
    hive = partitioning(keys)
    if not files:
        if schema is None:
            return pd.DataFrame()
        return pa.unify_schemas([schema, hive.schema]).empty_table().to_pandas(date_as_object=False)
    dataset = ds.dataset(
        [str(path) for path in files],
        schema=None if schema is None else pa.unify_schemas([schema, hive.schema]),
        format="parquet",
        partitioning=hive,
        partition_base_dir=str(table_dir),
    )
    expression = pq.filters_to_expression(_date_filters(filters)) if isinstance(filters, list) else filters
    return dataset.to_table(filter=expression).to_pandas(date_as_object=False)
