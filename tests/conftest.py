"""Shared test setup: the shared fixtures, the ComfyUI host (in process or as a server), the sampler server.

The repository root is on the import path through ``pythonpath`` in pytest.ini, so tests import
``selfforcing_core`` and the ``support`` helpers normally.
"""
import importlib
import os
import sys

import pytest

from support.comfy_paths import REPO_ROOT, comfyui_root
from support.decoder_weights import wan_vae_state_dict

FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"

# dtype "auto" picks bf16 on CPUs with bf16 matrix instructions; tests (and the hosts and processes
# they start) get the same choices on every machine. test_precision.py checks the detection itself.
os.environ["SELFFORCING_CPU_BF16"] = "0"


@pytest.fixture
def fixtures_dir():
    """Path of ../shared/fixtures; skips the test when it is absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def comfy_server():
    """A real ComfyUI server with this pack linked in, one per session (support/comfy_host.py)."""
    from support.comfy_host import session_server
    yield from session_server()


@pytest.fixture
def comfy_import():
    """``comfy_import("comfy.x")`` imports a ComfyUI module in process on the CPU (no server); the
    test skips without a host. The host root goes first on sys.path (this is the one place that
    edits it), so the host's `nodes.py` then shadows the pack's `nodes` package."""
    root = comfyui_root()
    if root is None:
        pytest.skip("ComfyUI host not found (set COMFYUI_PATH or create .host/ComfyUI)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    return importlib.import_module


@pytest.fixture
def comfy_api_import(comfy_import):
    """The host root, importable in process (see ``comfy_import``); skips without a host."""
    return comfyui_root()


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session server with a tiny generator, decoders and two prompts in its model folders
    (the node end-to-end tests; a test module may define its own ``server``)."""
    from support.comfy_host import write_tiny_generator, write_tiny_lora, write_tiny_models

    write_tiny_models(comfy_server)
    write_tiny_generator(comfy_server, "longlive_tiny.safetensors")  # a file name naming a family
    write_tiny_lora(comfy_server)
    comfy_server.write_safetensors("diffusion_models", "not_a_generator.safetensors", wan_vae_state_dict())
    comfy_server.write_safetensors("vae", "wan_2.1_vae.safetensors", wan_vae_state_dict())
    return comfy_server
