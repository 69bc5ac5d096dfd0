"""musc-pipeline: zero-shot industrial anomaly detection (MuSc) as a batch pipeline."""
