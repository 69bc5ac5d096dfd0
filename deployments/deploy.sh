#!/usr/bin/env bash
# Deploy the MuSc flows from prefect.yaml with the site's settings and their defaults.
#   deployments/deploy.sh --all              every deployment
#   deployments/deploy.sh -n nightly-score   one of them
# Settings: the environment, else deployments/site.env (or the file in MUSC_SITE_ENV),
# else the defaults below. Prefect's {{ $VAR }} templating has no defaults of its own.
set -euo pipefail
project_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
site_env="${MUSC_SITE_ENV:-$project_dir/deployments/site.env}"
if [[ -f "$site_env" ]]; then
    # Only fill what the environment does not already set.
    while IFS='=' read -r key value; do
        [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        [[ -n "${!key+set}" ]] || export "$key=$value"
    done < <(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$site_env")
fi

export MUSC_WORK_POOL="${MUSC_WORK_POOL:-musc}"
export MUSC_PROJECT_DIR="${MUSC_PROJECT_DIR:-$project_dir}"
export MUSC_DASK_ADDRESS="${MUSC_DASK_ADDRESS-}"
export MUSC_DEVICE="${MUSC_DEVICE:-auto}"
export MUSC_TIMEZONE="${MUSC_TIMEZONE:-UTC}"
export MUSC_NIGHTLY_CRON="${MUSC_NIGHTLY_CRON:-0 2 * * *}"
export MUSC_REFERENCES="${MUSC_REFERENCES-}"
export MUSC_REFERENCE_MODE="${MUSC_REFERENCE_MODE:-combined}"
: "${MUSC_INPUT_PATTERN:?set MUSC_INPUT_PATTERN, e.g. /data/captures/{date} (see deployments/site.env.example)}"
: "${MUSC_RESULTS_DIR:?set MUSC_RESULTS_DIR, e.g. /data/musc-results (see deployments/site.env.example)}"
export MUSC_INPUT_PATTERN MUSC_RESULTS_DIR
export MUSC_EVAL_DIR="${MUSC_EVAL_DIR:-${MUSC_RESULTS_DIR%/}-evaluation}"
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api}"
export PREFECT_API_URL

[[ "$MUSC_INPUT_PATTERN" == *"{date}"* ]] || { echo "MUSC_INPUT_PATTERN must contain {date}" >&2; exit 2; }
[[ "$MUSC_REFERENCE_MODE" =~ ^(few-shot|plus|combined)$ ]] || {
    echo "MUSC_REFERENCE_MODE must be few-shot, plus or combined, got '$MUSC_REFERENCE_MODE'" >&2; exit 2; }
[[ -d "$MUSC_PROJECT_DIR/flows" ]] || { echo "MUSC_PROJECT_DIR=$MUSC_PROJECT_DIR has no flows/" >&2; exit 2; }

cd "$project_dir"
exec "${PREFECT_BIN:-prefect}" deploy --no-prompt "$@"
