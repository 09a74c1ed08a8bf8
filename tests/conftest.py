"""Shared test setup: make the repository importable and locate the shared fixtures."""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture
def fixtures_dir():
    """Path of ../shared/fixtures; skips the test when it is absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES
