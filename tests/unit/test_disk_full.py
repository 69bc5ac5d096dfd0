"""A full disk: one clear error naming the path and the space, nothing half-written left, never retried."""

import errno
import pickle
import re

import numpy as np
import pytest
from prefect.states import Failed

from musc_tasks.atomic import DiskFull, disk_full_message, human_bytes, write_atomic
from musc_tasks.store import write_maps_store
from musc_tasks.tasks import _transient_io_error

from ..tmpfs import small_tmpfs


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs."""
    with small_tmpfs(tmp_path / "disk", "64k") as folder:
        yield folder


def test_a_write_that_does_not_fit_names_the_path_and_the_space_and_leaves_nothing(small_disk):
    write_atomic(small_disk / "kept.json", b"{}")
    target = small_disk / "night" / "big.bin"
    with pytest.raises(DiskFull) as raised:
        write_atomic(target, b"x" * 100_000)
    assert raised.value.errno == errno.ENOSPC
    assert re.fullmatch(
        rf"disk full: writing {re.escape(str(target))} needs about 97\.7 KiB, [\d.]+ KiB free there;"
        r" free space and run again \(finished work is kept\)",
        str(raised.value),
    ), str(raised.value)
    assert sorted(p.name for p in small_disk.rglob("*")) == ["kept.json", "night"]  # no temp file


def test_a_maps_store_that_does_not_fit_leaves_no_staging_folder(small_disk):
    path = small_disk / "maps" / "p.zarr"
    with pytest.raises(DiskFull, match=f"writing {path} needs about 2.0 MiB"):
        write_maps_store(path, np.ones((64, 128, 128), np.float16), {"image_ids": []})
    assert not list((small_disk / "maps").iterdir())


def test_disk_full_crosses_process_boundaries_intact():
    error = DiskFull(errno.ENOSPC, "disk full: writing /x needs about 1 B, 0 B free there", "/x")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.errno, copy.filename, str(copy)) == (DiskFull, errno.ENOSPC, "/x", str(error))


def test_a_libraries_bare_enospc_gets_the_same_one_line(tmp_path):
    message = disk_full_message(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f")))
    assert message.startswith(f"disk full: writing {tmp_path / 'f'}, ") and message.count("\n") == 0


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (OSError(errno.EIO, "Input/output error"), True),  # a busy share: worth a second try
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
        (DiskFull(errno.ENOSPC, "disk full", "/x"), False),
        (FileNotFoundError(errno.ENOENT, "gone"), False),
    ],
)
def test_a_full_disk_is_not_retried(error, retried):
    assert _transient_io_error(None, None, Failed(data=error)) is retried


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
