#!/usr/bin/env bash
# Set up (scripts/setup.sh) and serve the embedded default model on http://127.0.0.1:8000 .
# Extra arguments go to `rahf serve` (for example --port 9000 --profile-dir ./profiles).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec rahf serve --host "${RAHF_HOST:-127.0.0.1}" --port "${RAHF_PORT:-8000}" --profile-dir "${RAHF_PROFILE_DIR:-profiles}" "$@"
