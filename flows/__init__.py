"""Prefect flows of musc-pipeline."""

import musc_tasks  # noqa: F401  (first: turns analytics off before Prefect is imported)
