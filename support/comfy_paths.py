"""Locate the ComfyUI host tree: ``$COMFYUI_PATH`` if set, else ``<repo>/.host/ComfyUI``.

Tests import the host's modules in process through the ``comfy_import`` fixture (tests/conftest.py).
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def comfyui_root() -> Path | None:
    """The ComfyUI root directory (holding ``comfy/``), or None when there is none."""
    root = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".host" / "ComfyUI")
    return root if (root / "comfy").is_dir() else None
