"""Test glue for the real ComfyUI host: skip without one, one server per test session.

The server itself is ``scripts/comfy_server.py`` (shared with the main-job script).
"""
import sys

from comfy_paths import REPO_ROOT, comfyui_root

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from comfy_server import (ComfyServer, PACK_NAME, PromptExecutionError, PromptValidationError,  # noqa: E402,F401
                          status_messages)

SETUP_ERROR_FILE = REPO_ROOT / ".host" / "setup-error.txt"


def find_host_or_skip():
    """The host root (comfy_paths.comfyui_root); skips the test, saying why, when there is none."""
    import pytest

    root = comfyui_root()
    if root is None:
        reason = SETUP_ERROR_FILE.read_text().strip() if SETUP_ERROR_FILE.is_file() else "not set up"
        pytest.skip(f"NO COMFYUI HOST ({reason}): run `.venv/bin/python scripts/setup_host.py` "
                    "or set COMFYUI_PATH to a ComfyUI >= 0.3.75 folder")
    return root


def session_server():
    """Generator behind the session-wide `comfy_server` fixture: skip without a host, fail loudly
    when the server or the pack does not come up."""
    server = ComfyServer(find_host_or_skip()).start()
    print(f"\nComfyUI server up in {server.start_seconds:.1f} s on port {server.port}")
    try:
        yield server
    finally:
        server.stop()
