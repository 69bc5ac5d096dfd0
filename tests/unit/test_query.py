"""`musc query`: DuckDB SQL over OUT's tables, one view per table, partitions as columns."""

import pandas as pd

from musc_tasks.cli import main


def test_query_reads_the_tables_as_views(tmp_path, capsys):
    for product, scores in (("bolt", [0.9, 0.1]), ("nut", [0.5])):
        folder = tmp_path / "tables" / "scores" / "date=2026-11-22" / f"product={product}"
        folder.mkdir(parents=True)
        paths = [f"{product}/{i}.png" for i in range(len(scores))]
        pd.DataFrame({"path": paths, "score": scores}).to_parquet(folder / "key.parquet")
    sql = "SELECT product, path, score FROM scores WHERE date = '2026-11-22' ORDER BY score DESC LIMIT 2"
    assert main(["query", sql, "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["bolt", "bolt/0.png", "0.9"] and lines[2].split() == ["nut", "nut/0.png", "0.5"]
    assert main(["query", "SELECT nope FROM scores", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("musc: error: SQL: ") and err.count("\n") == 1 and "views: scores" in err
    assert main(["query", "SELECT 1", "--out", str(tmp_path / "empty")]) == 2
    assert "holds no table" in capsys.readouterr().err


def test_query_views_type_date_as_a_date(tmp_path, capsys):
    for day in ("2026-10-31", "2026-11-01", "2026-11-22"):
        folder = tmp_path / "tables" / "scores" / f"date={day}" / "product=2024"
        folder.mkdir(parents=True)
        pd.DataFrame({"path": [f"{day}.png"], "score": [0.5]}).to_parquet(folder / "key.parquet")
    sql = (
        "SELECT typeof(date) t, typeof(product) p, count(*) n FROM scores WHERE date >= DATE '2026-11-01' GROUP BY ALL"
    )
    assert main(["query", sql, "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["DATE", "VARCHAR", "2"]


def test_query_unites_nights_published_before_a_column_existed(tmp_path, capsys):
    """`crop_path` (regions) came later: the regions view still has it, null on the older night."""
    for day, extra in (("2026-11-21", {}), ("2026-11-22", {"crop_path": ["/out/crops/a/1.jpg"]})):
        folder = tmp_path / "tables" / "regions" / f"date={day}" / "product=p"
        folder.mkdir(parents=True)
        pd.DataFrame({"path": ["/in/a.png"], "region": [1], **extra}).to_parquet(folder / "key.parquet")
    sql = "SELECT date, coalesce(crop_path, '-') c FROM regions ORDER BY date"
    assert main(["query", sql, "--out", str(tmp_path)]) == 0
    assert [line.split() for line in capsys.readouterr().out.splitlines()[1:]] == [
        ["2026-11-21", "-"],
        ["2026-11-22", "/out/crops/a/1.jpg"],
    ]
