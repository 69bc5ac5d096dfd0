"""Reference sets: add (tokens extracted once), list, remove, versions, cap, clear errors."""

import shutil

import pytest

from musc_tasks.cli import main
from musc_tasks.demo import make_demo_day
from musc_tasks.layout import token_store_path
from musc_tasks.references import list_reference_sets, read_reference_set, reference_tokens
from musc_tasks.store import token_index

from ..conftest import TINY_SPEC, backbone_options

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights")

TINY = backbone_options(TINY_SPEC)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    day = make_demo_day(root / "day", seed=3, images_per_product=4, defects_per_product=0, size=96)
    folder = root / "brick-golden"
    shutil.copytree(day.input_dir / "brick", folder)
    (folder / "notes.png").write_bytes(b"not an image")
    return folder


def test_add_list_remove_versions(golden, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["references", "add", "--product", "brick", "--out", str(out), str(golden), *TINY]) == 0
    first = read_reference_set(out, TINY_SPEC.key, "brick", "golden")
    assert first.version == 1 and len(first.entries) == 4
    assert all(e.added_by.startswith("user:") and e.source_path.startswith(str(golden)) for e in first.entries)
    assert "notes.png" in capsys.readouterr().err  # the broken file is named, the others are added
    store = token_store_path(out, TINY_SPEC.key, "brick")
    assert set(token_index(store)) >= {e.image_id for e in first.entries}
    layers = reference_tokens(first)
    assert len(layers) == 2 and layers[0].shape[0] == 4

    # adding the same folder again extracts nothing and keeps the version
    assert main(["references", "add", "--product", "brick", "--out", str(out), str(golden), *TINY]) == 0
    assert read_reference_set(out, TINY_SPEC.key, "brick", "golden") == first

    assert main(["references", "list", "--out", str(out)]) == 0
    assert f"brick\t{first.label}\t4 images" in capsys.readouterr().out

    dropped = first.entries[0].image_id[:10]
    assert main(["references", "remove", "--product", "brick", "--out", str(out), dropped, *TINY]) == 0
    second = read_reference_set(out, TINY_SPEC.key, "brick", "golden")
    assert second.version == 2 and len(second.entries) == 3 and second.content_key != first.content_key

    assert main(["references", "remove", "--product", "brick", "--out", str(out), *TINY]) == 0
    assert list_reference_sets(out) == []


def test_cap_and_missing_set_are_clear_errors(golden, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["references", "add", "--product", "brick", "--out", str(out), str(golden), "--max", "2", *TINY]
    assert main(args) == 2
    assert "over its cap of 2" in capsys.readouterr().err
    assert main(["references", "remove", "--product", "brick", "--out", str(out), *TINY]) == 2
    assert "no reference set 'golden'" in capsys.readouterr().err
    assert main(["references", "add", "--product", "brick", "--out", str(out), str(tmp_path), *TINY]) == 2
    assert "holds no image" in capsys.readouterr().err
