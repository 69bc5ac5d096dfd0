"""musc-pipeline: zero-shot industrial anomaly detection (MuSc) as a batch pipeline."""

import os

# Nothing phones home: Prefect's SDK analytics (read when prefect is first imported), its
# server's telemetry service and every library honouring DO_NOT_TRACK stay off unless the
# environment turns them on. flows/ imports this package before Prefect for the same reason.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
