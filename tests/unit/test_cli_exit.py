"""The `musc` process ends with `os._exit` after its exit handlers: same status, same output, no teardown.

Each case runs twice as a real process, through `entry_point` (as the console script and
``python -m musc_tasks.cli`` do) and through the ordinary ``sys.exit(main())``, and the two must
print the same bytes and end with the same status.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
ORDINARY = "import sys; from musc_tasks.cli import main; sys.exit(main())"


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],  # argparse's exit 0
        ["score", "--help"],
        ["no-such-command"],  # argparse's exit 2
        ["score", "/no/such/night", "--out", "out"],  # main returns 2
        ["fetch-weights", "--backbone", "ViT-L-14-335"],
    ],
)
def test_the_command_keeps_its_status_and_output(argv):
    fast = _run([sys.executable, "-m", "musc_tasks.cli", *argv])
    ordinary = _run([sys.executable, "-c", ORDINARY, *argv])
    assert (fast.returncode, fast.stdout, fast.stderr) == (ordinary.returncode, ordinary.stdout, ordinary.stderr)
    assert fast.returncode in (0, 2) and (fast.stdout or fast.stderr)


# A command whose main starts a non-daemon thread and returns CODE (or raises), with an exit
# handler that writes 2 MB to the piped stdout, and an object whose finaliser runs only in the
# interpreter's teardown.
SCRIPT = """
import atexit, sys, threading, time
import musc_tasks.cli as cli

class Teardown:
    def __del__(self):
        sys.stderr.write("interpreter teardown\\n")

kept = Teardown()

def late_thread():
    time.sleep(0.5)
    sys.stdout.write("thread joined\\n")

def handler():
    sys.stdout.write("x" * 2_000_000 + "\\nexit handler ran\\n")

def main():
    atexit.register(handler)
    threading.Thread(target=late_thread).start()
    if CODE == "raise":
        raise RuntimeError("boom")
    return CODE

cli.main = main
if sys.argv[1] == "entry":
    cli.entry_point()
else:
    sys.exit(cli.main())
"""


@pytest.mark.parametrize("code", [0, 1, 3, "raise"])
def test_threads_join_and_exit_handlers_run_before_the_process_ends(code):
    script = SCRIPT.replace("CODE ==", f"{code!r} ==").replace("return CODE", f"return {code!r}")
    fast = _run([sys.executable, "-c", script, "entry"])
    ordinary = _run([sys.executable, "-c", script, "ordinary"])
    expected = "thread joined\n" + "x" * 2_000_000 + "\nexit handler ran\n"
    assert fast.stdout == ordinary.stdout == expected
    assert fast.returncode == ordinary.returncode == (1 if code == "raise" else code)
    assert "interpreter teardown" in ordinary.stderr
    if code == "raise":  # an error with a traceback leaves the ordinary way
        assert "RuntimeError: boom" in fast.stderr and "interpreter teardown" in fast.stderr
    else:
        assert fast.stderr == ""


def test_the_console_script_is_the_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["musc"] == "musc_tasks.cli:entry_point"
