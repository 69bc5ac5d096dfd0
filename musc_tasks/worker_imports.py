"""The stages' modules, imported by each local Dask worker as it starts (Dask's ``preload``).

A worker then imports torch, scikit-image and the stages in its one main thread, before it
takes any task or data. Imports parse source (torch's jit overloads, scikit-image's lazy
stubs through ``ast.parse``), and CPython 3.11 counts the AST constructor's recursion depth per
interpreter, not per thread (python/cpython#106905): a worker whose task thread was still
importing for its first task while its event loop unpickled scattered data that imported the
publish stage failed the run with ``SystemError: AST constructor recursion depth mismatch``.
Workers started by hand take the same module: ``dask worker --preload musc_tasks.worker_imports``.
"""

from . import extract, publish, reference_scoring, scoring  # noqa: F401
