#!/usr/bin/env bash
# The main job: set up .venv and the ComfyUI host (or use $COMFYUI_PATH), then run the default
# text-to-video workflow headless to an mp4 in output/. Arguments go to scripts/generate.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m scripts.generate "$@"
