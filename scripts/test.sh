#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine, then runs the whole suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "setup failed"; exit 1; }
.venv/bin/python -m pytest tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure"
    exit 1
fi
exit "$rc"
