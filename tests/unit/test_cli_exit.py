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


# A command that receives SIGTERM where the exit its handler raises cannot pass as it is: in a
# garbage collector's callback (Python drops it) or in pydantic's serializer (pydantic turns it into
# an error of its own), as in the flows' imports next to a local Dask scheduler.
SIGTERM_SCRIPT = """
import gc, signal, sys, time
import pydantic
import musc_tasks.cli as cli

def sigterm_here():
    signal.raise_signal(signal.SIGTERM)  # its handler runs before this call returns

def in_a_gc_callback():
    def callback(phase, info):
        if phase == "start" and callback in gc.callbacks:
            gc.callbacks.remove(callback)
            sigterm_here()
    gc.callbacks.append(callback)
    gc.collect()

class Settings(pydantic.BaseModel):
    @pydantic.model_serializer
    def serialize(self):
        sigterm_here()
        return {}

def in_a_pydantic_serializer():
    Settings().model_dump()

def main():
    try:
        WHERE()
        time.sleep(0.2)
        sys.stdout.write("ran on\\n")
        return 0
    finally:
        sys.stdout.write("unwound\\n")

cli.main = main
cli.entry_point()
"""


@pytest.mark.parametrize("where", ["in_a_gc_callback", "in_a_pydantic_serializer"])
def test_a_sigterm_ends_the_command_where_its_exit_cannot_pass(where):
    done = _run([sys.executable, "-c", SIGTERM_SCRIPT.replace("WHERE()", f"{where}()")])
    assert (done.returncode, done.stdout, done.stderr) == (143, "unwound\n", "")
