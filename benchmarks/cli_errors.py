"""How long `musc` takes to refuse a bad option or input, from process start to exit status 2.

Usage: .venv/bin/python benchmarks/cli_errors.py [--repeats 5]
Runs each error case of issue 15 as a fresh `python -m musc_tasks.cli` process and prints the
median and the worst wall time, the exit status and the one-line message. Compare with
`python -c pass` (the interpreter's own start) printed first.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cases(root: Path) -> dict[str, list[str]]:
    day = root / "day" / "bolt"
    day.mkdir(parents=True)
    (day / "000.png").write_bytes(b"x")
    empty = root / "empty" / "bolt"
    empty.mkdir(parents=True)
    (root / "mvtec" / "bottle" / "test" / "good").mkdir(parents=True)
    out = str(root / "out")
    score = ["score", str(root / "day"), "--out", out]
    return {
        "missing input folder": ["score", str(root / "missing"), "--out", out],
        "empty input folder": ["score", str(root / "empty"), "--out", out],
        "bad --date": [*score, "--date", "22-11-2026"],
        "--pool-size 1": [*score, "--pool-size", "1"],
        "--image-size 225": [*score, "--preset", "fast", "--image-size", "225"],
        "missing checkpoint": [*score, "--pretrained", "/no/such.pth"],
        "unknown --backbone": [*score, "--backbone", "ViT-L-14-335"],
        "evaluate, wrong layout": ["evaluate", str(root / "mvtec"), "--layout", "visa", "--out", out],
        "compare, no results": ["compare", "--out", out, "--date", "2026-11-22", "--backbones", "a,b"],
    }


def timed(command: list[str]) -> tuple[float, int, str]:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - began, done.returncode, done.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    baseline = [timed([sys.executable, "-c", "pass"])[0] for _ in range(args.repeats)]
    print(f"{'python -c pass':<24} median {statistics.median(baseline):.2f} s  max {max(baseline):.2f} s")
    with tempfile.TemporaryDirectory() as folder:
        for name, argv in cases(Path(folder)).items():
            runs = [timed([sys.executable, "-m", "musc_tasks.cli", *argv]) for _ in range(args.repeats)]
            seconds = [r[0] for r in runs]
            _, status, message = runs[-1]
            print(f"{name:<24} median {statistics.median(seconds):.2f} s  max {max(seconds):.2f} s  exit {status}")
            print(f"    {message}")


if __name__ == "__main__":
    main()
