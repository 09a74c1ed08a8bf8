#!/usr/bin/env bash
# Create .venv (Python 3.11) with the pinned torch and the test dependencies. Idempotent:
# a stamp keyed by the requirement files skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements-dev.txt
    # Development install: `selfforcing_core` and `support` import from this checkout anywhere, so
    # `python benchmarks/bench_x.py` works as well as `python -m benchmarks.bench_x`.
    .venv/bin/python -m pip install --quiet --no-deps -e .
    touch "$stamp"
fi
.venv/bin/python scripts/setup_host.py || true  # on failure the host tests skip, saying why
# Headless Chromium for the workflow browser tests (Debian's package; playwright only drives it).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "setup: could not install chromium; the browser tests will skip" >&2
fi
