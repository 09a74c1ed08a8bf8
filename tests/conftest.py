"""Shared test setup: make the repository importable and locate the shared fixtures."""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

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
    """A real ComfyUI server with this pack linked in, one per session (tests/comfy_host.py)."""
    from comfy_host import session_server
    yield from session_server()


@pytest.fixture(scope="session")
def comfy_api_import():
    """Host root put first on sys.path for in-process `import comfy...` (no server; CPU device);
    skips without a host. The host's `nodes.py` then shadows the pack's `nodes` package."""
    from comfy_host import find_host_or_skip
    from comfy_paths import import_comfy
    root = find_host_or_skip()
    import_comfy("comfy.cli_args")  # puts the root on sys.path and selects the CPU
    return root
