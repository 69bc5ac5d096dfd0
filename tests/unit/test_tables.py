"""Parquet result tables: schemas, atomic hive-partition publish, readers."""

import threading
from datetime import date, datetime, timezone

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from musc_tasks.tables import (
    METRICS_SCHEMA,
    REGIONS_SCHEMA,
    RUNS_SCHEMA,
    SCORES_SCHEMA,
    duckdb_hive_types,
    empty_table,
    partition_keys,
    partition_path,
    partitioning,
    publish_partition,
    read_table,
    remove_stale,
    to_table,
)

DATE = "2026-11-22"


def _score_rows(n, *, backbone="vit-a", run_id="run-1", offset=0):
    return [
        {
            "image_id": f"{i + offset:064x}",
            "path": f"in/img_{i + offset}.png",
            "width": 640,
            "height": 480,
            "score": 0.5 + i,
            "raw_score": 0.4 + i,
            "rank": n - i,
            "flagged": i == n - 1,
            "image_threshold": 1.0,
            "pixel_threshold": 0.3,
            "pool_index": 0,
            "pool_images": n,
            "anomalous_fraction": 0.01 * i,
            "mask_path": f"masks/{i}.png",
            "heatmap_path": f"heatmaps/{i}.png",
            "backbone_key": backbone,
            "run_id": run_id,
            "status": "scored",
        }
        for i in range(n)
    ]


def _publish_scores(scores_dir, product, n, **kwargs):
    stem = kwargs.get("backbone", "vit-a")
    table = to_table(_score_rows(n, **kwargs), SCORES_SCHEMA)
    return publish_partition(scores_dir, {"date": DATE, "product": product}, stem, table, SCORES_SCHEMA)


def test_partition_path_encoding():
    assert partition_path({"date": DATE, "product": "screw bolt"}).as_posix() == f"date={DATE}/product=screw%20bolt"
    assert partition_path({"product": "cap#2"}).as_posix() == "product=cap%232"
    assert partition_path({"product": "a/b~ü"}).as_posix() == "product=a%2Fb%7E%C3%BC"
    with pytest.raises(ValueError, match="partition value"):
        partition_path({"product": ""})
    with pytest.raises(ValueError, match="partition key"):
        partition_path({"bad key": "x"})


def test_round_trip_pandas_and_duckdb_with_odd_names(tmp_path):
    scores_dir = tmp_path / "tables" / "scores"
    path = _publish_scores(scores_dir, "screw bolt", 3)
    assert path == scores_dir / f"date={DATE}" / "product=screw%20bolt" / "vit-a.parquet"
    _publish_scores(scores_dir, "cap#2", 2, offset=10)

    frame = read_table(scores_dir)
    assert list(frame.columns) == SCORES_SCHEMA.names + ["date", "product"]
    assert sorted(frame.groupby("product").size().items()) == [("cap#2", 2), ("screw bolt", 3)]
    assert set(frame["date"]) == {pd.Timestamp(DATE)}
    assert frame.loc[frame["product"] == "screw bolt", "score"].tolist() == [0.5, 1.5, 2.5]
    assert len(read_table(scores_dir, filters=[("product", "=", "cap#2")])) == 2

    decoded = ds.dataset(scores_dir, format="parquet", partitioning="hive").to_table()
    assert set(decoded.column("product").to_pylist()) == {"cap#2", "screw bolt"}

    counts = duckdb.sql(
        f"select product, count(*) as n, max(rank) as top from read_parquet('{scores_dir}/**/*.parquet',"
        " hive_partitioning=true) group by product order by product"
    ).fetchall()
    assert counts == [("cap#2", 2, 2), ("screw bolt", 3, 3)]


def test_republish_replaces_and_stems_coexist(tmp_path):
    scores_dir = tmp_path / "scores"
    _publish_scores(scores_dir, "bottle", 5)
    _publish_scores(scores_dir, "bottle", 3, run_id="run-2")
    frame = read_table(scores_dir)
    assert len(frame) == 3 and set(frame["run_id"]) == {"run-2"}

    _publish_scores(scores_dir, "bottle", 4, backbone="vit-b")
    frame = read_table(scores_dir)
    assert frame.groupby("backbone_key").size().to_dict() == {"vit-a": 3, "vit-b": 4}
    assert sorted(p.name for p in (scores_dir / f"date={DATE}" / "product=bottle").iterdir()) == [
        "vit-a.parquet",
        "vit-b.parquet",
    ]


def test_identical_rows_give_identical_bytes(tmp_path):
    first = _publish_scores(tmp_path / "a", "bottle", 4).read_bytes()
    second = _publish_scores(tmp_path / "b", "bottle", 4).read_bytes()
    assert first == second


def test_schema_violations_raise(tmp_path):
    good = to_table(_score_rows(2), SCORES_SCHEMA)
    partition = {"date": DATE, "product": "bottle"}
    with pytest.raises(ValueError, match="scores.*missing columns \\['note'\\]"):
        publish_partition(tmp_path / "scores", partition, "k", good.drop_columns(["note"]), SCORES_SCHEMA)
    extra = good.append_column("date", pa.array([DATE] * 2))
    with pytest.raises(ValueError, match="extra columns \\['date'\\]"):
        publish_partition(tmp_path / "scores", partition, "k", extra, SCORES_SCHEMA)
    mistyped = good.set_column(good.schema.get_field_index("rank"), "rank", pa.array(["1", "2"]))
    with pytest.raises(ValueError, match="'rank'"):
        publish_partition(tmp_path / "scores", partition, "k", mistyped, SCORES_SCHEMA)
    fractional = good.set_column(good.schema.get_field_index("rank"), "rank", pa.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="'rank'"):
        publish_partition(tmp_path / "scores", partition, "k", fractional, SCORES_SCHEMA)
    with pytest.raises(ValueError, match="'run_id' is not nullable"):
        to_table([{**_score_rows(1)[0], "run_id": None}], SCORES_SCHEMA)
    with pytest.raises(ValueError, match="unknown columns \\['colour'\\]"):
        to_table([{**_score_rows(1)[0], "colour": "red"}], SCORES_SCHEMA)
    with pytest.raises(ValueError, match="status"):
        to_table([{**_score_rows(1)[0], "status": "done"}], SCORES_SCHEMA)
    with pytest.raises(ValueError, match="stem"):
        publish_partition(tmp_path / "scores", partition, ".hidden", good, SCORES_SCHEMA)
    assert not (tmp_path / "scores").exists()


def test_to_table_fills_nullable_and_accepts_pandas(tmp_path):
    row = {key: value for key, value in _score_rows(1)[0].items() if key not in ("score", "rank", "width")}
    table = to_table([{**row, "status": "failed", "error": "unreadable"}], SCORES_SCHEMA)
    assert table.column("score").null_count == 1 and table.column("rank").null_count == 1
    # A nullable int column round-trips through pandas as float64 with NaN.
    frame = table.to_pandas()
    assert frame["rank"].dtype == "float64"
    publish_partition(tmp_path / "scores", {"date": DATE, "product": "p"}, "k", frame, SCORES_SCHEMA)
    assert read_table(tmp_path / "scores")["error"].tolist() == ["unreadable"]


def test_other_schemas_and_empty_reads(tmp_path):
    runs_dir = tmp_path / "tables" / "runs"
    empty = read_table(runs_dir)
    assert empty.empty and list(empty.columns) == RUNS_SCHEMA.names + ["date"]
    assert str(empty["started_at"].dtype) == "datetime64[us, UTC]"
    assert list(read_table(tmp_path / "tables" / "metrics").columns) == METRICS_SCHEMA.names + ["dataset"]
    assert read_table(tmp_path / "unknown_table").empty
    assert empty_table(REGIONS_SCHEMA).schema == REGIONS_SCHEMA

    started = datetime(2026, 11, 22, 1, 0, tzinfo=timezone.utc)
    row = {name: 0 for name in RUNS_SCHEMA.names if name.startswith(("n_", "images_", "pairs_"))}
    row |= {name: 1.0 for name in RUNS_SCHEMA.names if name.startswith("seconds_")}
    row |= {
        "run_id": "run-1",
        "started_at": started,
        "finished_at": started,
        "backbone_key": "vit-a",
        "parameters": "{}",
        "versions": "{}",
        "input_dir": "/in",
        "status": "completed",
    }
    publish_partition(runs_dir, {"date": DATE}, "vit-a", to_table([row], RUNS_SCHEMA), RUNS_SCHEMA)
    frame = read_table(runs_dir)
    assert frame["started_at"].iloc[0] == started and frame["flow_run_id"].isna().all()
    assert frame["date"].tolist() == [pd.Timestamp(DATE)]


def test_remove_stale(tmp_path):
    scores_dir = tmp_path / "scores"
    for product in ("bottle", "cable", "screw bolt"):
        _publish_scores(scores_dir, product, 2)
    _publish_scores(scores_dir, "cable", 2, backbone="vit-b")
    keep = [{"date": DATE, "product": "bottle"}]
    removed = remove_stale(scores_dir, {"date": DATE}, "vit-a", keep)
    assert [path.parent.name for path in removed] == ["product=cable", "product=screw%20bolt"]
    assert not (scores_dir / f"date={DATE}" / "product=screw%20bolt").exists()  # emptied dir removed
    frame = read_table(scores_dir)
    assert sorted(zip(frame["product"], frame["backbone_key"]))[::2] == [("bottle", "vit-a"), ("cable", "vit-b")]
    assert remove_stale(scores_dir, {"date": "2026-11-23"}, "vit-a", keep) == []


def test_hidden_temp_files_are_ignored(tmp_path):
    scores_dir = tmp_path / "scores"
    published = _publish_scores(scores_dir, "bottle", 3)
    (published.parent / ".vit-a.parquet.123-abcd.tmp").write_bytes(b"PAR1 partial garbage")
    assert len(read_table(scores_dir)) == 3
    assert len(ds.dataset(scores_dir, format="parquet", partitioning="hive").to_table()) == 3
    n = duckdb.sql(f"select count(*) from read_parquet('{scores_dir}/**/*.parquet', hive_partitioning=true)").fetchall()
    assert n == [(3,)]
    # DuckDB's glob matches dot-files, so only the ".tmp" suffix hides a temp file from it;
    # the pyarrow readers also skip a hidden name that ends in ".parquet".
    (published.parent / ".vit-a.parquet").write_bytes(b"garbage")
    assert len(read_table(scores_dir)) == 3
    assert len(ds.dataset(scores_dir, format="parquet", partitioning="hive").to_table()) == 3


def test_concurrent_reader_sees_complete_tables(tmp_path):
    scores_dir = tmp_path / "scores"
    counts = [1 + (7 * i) % 23 for i in range(50)]
    _publish_scores(scores_dir, "bottle", counts[0])
    seen, errors = [], []
    done = threading.Event()

    def read_repeatedly():
        while not done.is_set():
            try:
                seen.append(ds.dataset(scores_dir, format="parquet", partitioning="hive").to_table().num_rows)
                seen.append(len(read_table(scores_dir)))
            except Exception as error:  # noqa: BLE001 - any failure is what the test looks for
                errors.append(error)

    reader = threading.Thread(target=read_repeatedly)
    reader.start()
    try:
        for n in counts:
            _publish_scores(scores_dir, "bottle", n)
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert seen and set(seen) <= set(counts)


def test_date_is_a_date_in_every_reader(tmp_path):
    """Date ranges work in the package's reader, in plain pandas with the schema, and in DuckDB."""
    scores_dir = tmp_path / "tables" / "scores"
    for day in ("2026-10-31", "2026-11-01", "2026-11-22"):
        table = to_table(_score_rows(2), SCORES_SCHEMA)
        publish_partition(scores_dir, {"date": day, "product": "2024"}, "vit-a", table, SCORES_SCHEMA)
    assert partition_keys(scores_dir) == ("date", "product")

    frame = read_table(scores_dir)
    assert str(frame["date"].dtype).startswith("datetime64") and frame["product"].unique().tolist() == ["2024"]
    assert len(frame[frame["date"] >= "2026-11-01"]) == 4
    assert len(frame[frame["date"].between("2026-10-01", "2026-10-31")]) == 2
    assert len(read_table(scores_dir, filters=[("date", ">=", "2026-11-01")])) == 4
    assert len(read_table(scores_dir, filters=[("date", "in", ["2026-10-31", date(2026, 11, 22)])])) == 4

    plain = pd.read_parquet(scores_dir, partitioning=partitioning(("date", "product")))
    assert len(plain[plain["date"] >= date(2026, 11, 1)]) == 4 and set(plain["product"]) == {"2024"}

    hive_types = duckdb_hive_types(("date", "product"))
    sql = f"read_parquet('{scores_dir}/**/*.parquet', hive_partitioning = true, hive_types = {hive_types})"
    types = duckdb.sql(f"SELECT typeof(date), typeof(product) FROM {sql} LIMIT 1").fetchall()[0]
    assert types == ("DATE", "VARCHAR")
    in_range = duckdb.sql(f"SELECT count(*) FROM {sql} WHERE date BETWEEN '2026-11-01' AND '2026-11-30'").fetchall()
    assert in_range == [(4,)]


def test_regions_published_before_crops_read_with_a_null_crop_path(tmp_path):
    """A night published before ``crop_path`` existed still reads beside newer ones, the column null."""
    regions_dir = tmp_path / "tables" / "regions"
    before = pa.schema([field for field in REGIONS_SCHEMA if field.name != "crop_path"])
    row = {
        "image_id": "0" * 64,
        "path": "/in/p/a.png",
        "region": 1,
        **dict(zip(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"), (3, 4, 9, 8))),
        "area_px": 20,
        "area_fraction": 0.01,
        "max_score": 0.9,
        "mean_score": 0.5,
        "centroid_x": 5.5,
        "centroid_y": 6.0,
        "region_rule": "pixel_threshold",
        "backbone_key": "vit-a",
        "run_id": "run-1",
    }
    crop = "/out/crops/2026-11-22/p/vit-a/a/1.jpg"
    publish_partition(regions_dir, {"date": "2026-11-21", "product": "p"}, "vit-a", to_table([row], before), before)
    new = to_table([{**row, "crop_path": crop}], REGIONS_SCHEMA)
    publish_partition(regions_dir, {"date": "2026-11-22", "product": "p"}, "vit-a", new, REGIONS_SCHEMA)

    frame = read_table(regions_dir).sort_values("date")
    assert frame["crop_path"].isna().tolist() == [True, False] and frame["crop_path"].iloc[1] == crop
    hive = partitioning(("date", "product"))
    plain = pd.read_parquet(regions_dir, partitioning=hive, schema=pa.unify_schemas([REGIONS_SCHEMA, hive.schema]))
    assert plain.sort_values("date")["crop_path"].isna().tolist() == [True, False]
    # DuckDB takes the first file's columns unless told to unite them by name (as `musc query` does)
    sql = (
        f"SELECT date::VARCHAR, crop_path FROM read_parquet('{regions_dir}/**/*.parquet', hive_partitioning = true, "
        f"hive_types = {duckdb_hive_types(('date', 'product'))}, union_by_name = true) ORDER BY date"
    )
    assert duckdb.sql(sql).fetchall() == [("2026-11-21", None), ("2026-11-22", crop)]
