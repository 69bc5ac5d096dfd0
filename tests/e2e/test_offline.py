"""Nothing phones home: `musc score` completes in a network namespace that has only loopback."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import TINY_CONFIG

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parents[2]
# Loopback up (the temporary Prefect server and Dask listen on it), then the command; no other interface exists.
LOOPBACK_UP = """
import fcntl, os, socket, struct, sys
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sh", fcntl.ioctl(probe, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
fcntl.ioctl(probe, 0x8914, struct.pack("16sh", b"lo", flags | 1))
os.execv(sys.argv[1], sys.argv[1:])
"""
NETWORK_ERRORS = re.compile(
    r"telemetry|Network is unreachable|Name or service not known|Temporary failure in name resolution"
    r"|ConnectError|ConnectionError|Failed to send|getaddrinfo",
    re.IGNORECASE,
)


def _no_network_namespace() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _no_network_namespace(), reason="needs `unshare -n` (root or user namespaces)")
def test_score_runs_without_network_and_sends_nothing(tmp_path):
    from musc_tasks.demo import make_demo_day

    day = make_demo_day(tmp_path / "day", seed=3, images_per_product=6, defects_per_product=1)
    # The user's environment as it comes: no analytics switches, no offline flags, no server.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HF_")) and k != "DO_NOT_TRACK"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO), MUSC_PROGRESS="0")
    musc = [sys.executable, "-m", "musc_tasks.cli", "score", str(day.input_dir), "--out", str(tmp_path / "out")]
    backbone = ["--backbone", "musc-tiny-vit", "--model-config", str(TINY_CONFIG), "--pretrained", "none"]
    command = ["unshare", "-n", sys.executable, "-c", LOOPBACK_UP, *musc, *backbone, "--image-size", "112"]
    done = subprocess.run(
        [*command, "--layers", "1,3", "--device", "cpu", "--date", "2026-11-22"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "MuSc 2026-11-22" in done.stdout
    assert not NETWORK_ERRORS.search(output), NETWORK_ERRORS.search(output).group(0) + "\n" + output[-4000:]
