"""What the forkserver of a `musc` command's local workers imports (`cluster.forked_workers`).

The stages (`worker_imports`) and the backbones' libraries, imported once for every worker
forked from it, the command's model on the CPU, loaded once for all of them
(`cluster.load_shared_backbone`), and a quick exit. open_clip (which imports timm and torchvision, 1.7 s of a core
here) was imported by each worker's warm-up after the worker had started, ahead of its first
extraction block; in the forkserver it is imported while the Prefect server starts.

The forkserver ends after its command, when it sees the command's end of a pipe close.
Ending the ordinary way it tore down an interpreter that imported torch, 0.7-1.1 s on this
machine, all the while holding the command's output streams open: whoever reads them to their
end (a benchmark, a scheduler capturing the command's output) waited that long after the command
had exited. The forkserver writes nothing that needs the teardown. Its forked workers do not run
it: multiprocessing ends each of them with ``os._exit`` after flushing its streams.
"""

import atexit
import os

import open_clip  # noqa: F401

from . import worker_imports  # noqa: F401
from .cluster import load_shared_backbone

load_shared_backbone()
atexit.register(os._exit, 0)  # registered last, so it runs first
