#!/usr/bin/env bash
# An MLflow tracking server for BMoE sweeps: a database backend and an artifact store.
#
#   infra/mlflow/serve.sh                         # sqlite + ./mlflow-server/artifacts on 127.0.0.1:5000
#   BMOE_MLFLOW_BACKEND=postgresql://mlflow:PASSWORD@db.internal:5432/mlflow \
#   BMOE_MLFLOW_ARTIFACTS=s3://my-bucket/mlflow-artifacts \
#   BMOE_MLFLOW_HOST=10.0.0.5 BMOE_MLFLOW_ALLOWED_HOSTS=10.0.0.5:5000 infra/mlflow/serve.sh
#
# Then point every stage at it: `bmoe sweep ... --tracking-uri http://127.0.0.1:5000`.
# PostgreSQL needs `pip install psycopg2-binary`, s3:// artifacts `pip install boto3`.
# It binds 127.0.0.1 unless BMOE_MLFLOW_HOST says otherwise: MLflow has no authentication by
# default, so reach a remote server through an SSH tunnel (ssh -L 5000:127.0.0.1:5000 head)
# rather than opening the port.
set -euo pipefail

DATA="${BMOE_MLFLOW_DATA:-$PWD/mlflow-server}"
HOST="${BMOE_MLFLOW_HOST:-127.0.0.1}"
PORT="${BMOE_MLFLOW_PORT:-5000}"
BACKEND="${BMOE_MLFLOW_BACKEND:-sqlite:///$DATA/mlflow.db}"
ARTIFACTS="${BMOE_MLFLOW_ARTIFACTS:-$DATA/artifacts}"
WORKERS="${BMOE_MLFLOW_WORKERS:-2}"
MLFLOW="${MLFLOW:-$(command -v mlflow || true)}"
# MLflow 3's server also starts a job runner (a pool of huey consumer processes) for its GenAI
# jobs; sweeps only track runs and register models, so it is off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

if [[ -z "$MLFLOW" ]]; then
    echo "error: mlflow not found; run 'make setup' and use .venv/bin, or set MLFLOW=/path/to/mlflow" >&2
    exit 1
fi
if [[ "$BACKEND" == sqlite:///* || "$ARTIFACTS" != *://* ]]; then
    mkdir -p "$DATA"
fi
extra=()
if [[ -n "${BMOE_MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    extra+=(--allowed-hosts "$BMOE_MLFLOW_ALLOWED_HOSTS")
fi

echo "mlflow server on http://$HOST:$PORT (backend ${BACKEND%%://*}://..., artifacts $ARTIFACTS)"
exec "$MLFLOW" server --host "$HOST" --port "$PORT" --backend-store-uri "$BACKEND" \
    --artifacts-destination "$ARTIFACTS" --workers "$WORKERS" "${extra[@]}"
