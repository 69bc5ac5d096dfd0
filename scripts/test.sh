#!/usr/bin/env bash
# The test suite, isolated from the user's Prefect and Hugging Face setup.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT_HOME="$(mktemp -d)"
export PREFECT_HOME
trap 'rm -rf "$PREFECT_HOME"' EXIT
unset PREFECT_API_URL
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_SERVER_UI_ENABLED=false
export NO_PROXY=127.0.0.1,localhost HF_HUB_OFFLINE=1
# pytest exits 5 when it collected no test: that is a failure here, and it stays one.
# The 25 slowest tests are listed: the suite has a ~20 min budget on 2 cores.
.venv/bin/python -m pytest -q --durations=25 "$@"
