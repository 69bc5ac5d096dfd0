"""Functions the tests run on Dask workers, in a module that imports nothing at its top.

A worker unpickles a task's function in its event loop, importing the function's module there
while its task thread may still import for the warm-up. Sent from a test module, the function
imported the test's own imports (Prefect, which configures logging under logging's lock): a
worker deadlocked with its task thread, which held an import lock in torchvision and waited
for logging's lock to log a GC pause, and the suite hung.
"""


def model_cache_after_a_block(spec) -> tuple[int, int] | str:
    """On a worker, what the first extraction block finds: (models loaded, cache hits) after it, or its error."""
    from musc_tasks.extract import worker_backbone

    try:
        worker_backbone(spec, "cpu")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    info = worker_backbone.cache_info()
    return info.misses, info.hits
