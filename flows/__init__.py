"""Prefect flows of musc-pipeline."""
