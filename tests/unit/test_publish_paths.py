"""Output paths come from file names and product folders: they must never leave OUT."""

import pytest

from musc_tasks.publish import output_relpath, printable


def test_output_paths_keep_the_input_tree():
    assert (
        output_relpath("masks", "2026-11-22", "bottle", "key", "line a/001.jpg", keep_suffix=False)
        == "masks/2026-11-22/bottle/key/line a/001.png"
    )
    assert (
        output_relpath("masks", "2026-11-22", "bottle", "key", "001.jpg", keep_suffix=True)
        == "masks/2026-11-22/bottle/key/001.jpg.png"
    )


@pytest.mark.parametrize("relpath", ["../../etc/passwd.png", "a/../../b.png", "/etc/x.png"])
def test_crafted_names_cannot_escape(relpath):
    with pytest.raises(ValueError, match="inside its product folder"):
        output_relpath("masks", "2026-11-22", "bottle", "key", relpath, keep_suffix=False)


def test_undecodable_bytes_become_escapes():
    assert printable("caf\udce9.png") == "caf\\xe9.png"
    assert printable("plain.png") == "plain.png"
