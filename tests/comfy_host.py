"""Test glue for the real ComfyUI host: skip without one, one server per test session.

The server itself is ``scripts/comfy_server.py`` (shared with the main-job script).
"""
import asyncio
import json
import struct
import sys
import uuid

from comfy_paths import REPO_ROOT, comfyui_root

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from comfy_server import ComfyServer, PACK_NAME, PromptExecutionError, PromptValidationError  # noqa: E402,F401

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


def run_watching(server, graph, node, on_progress=None):
    """POST /prompt as a browser tab would and follow the websocket until the run ends.

    on_progress(value) is called for each progress event of ``node``. Returns (the final event type:
    execution_success / _error / _interrupted, [(value, max)] of ``node``, preview images received,
    prompt id).
    """
    import aiohttp
    client_id = uuid.uuid4().hex

    async def watch():
        progress, previews = [], 0
        url = f"http://127.0.0.1:{server.port}/ws?clientId={client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as socket:
            prompt_id = await asyncio.to_thread(server.queue_prompt, graph, client_id)
            async for message in socket:
                if message.type == aiohttp.WSMsgType.BINARY:  # BinaryEventTypes.PREVIEW_IMAGE = 1 (JPEG bytes)
                    previews += struct.unpack(">I", message.data[:4])[0] == 1
                    continue
                event = json.loads(message.data)
                if event["type"] == "progress" and event["data"]["node"] == node:
                    progress.append((event["data"]["value"], event["data"]["max"]))
                    if on_progress is not None:
                        await asyncio.to_thread(on_progress, progress[-1][0])
                if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    return event["type"], progress, previews, prompt_id
    return asyncio.run(asyncio.wait_for(watch(), 300))
