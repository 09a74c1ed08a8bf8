"""Locate the ComfyUI host tree and import its modules for parity tests (no server needed).

The tree is ``$COMFYUI_PATH`` if set, else ``<repo>/.host/ComfyUI``. Tests that need it call
``import_comfy(...)``, which skips the test when no tree is found.
"""
import importlib
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def comfyui_root() -> Path | None:
    """The ComfyUI root directory (holding ``comfy/``), or None when there is none."""
    root = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".host" / "ComfyUI")
    return root if (root / "comfy").is_dir() else None


def import_comfy(module: str):
    """Import a ComfyUI module (e.g. ``comfy.ldm.wan.vae``) on the CPU; skip the test if no host."""
    root = comfyui_root()
    if root is None:
        pytest.skip("ComfyUI host not found (set COMFYUI_PATH or create .host/ComfyUI)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    return importlib.import_module(module)
