"""Reproduce fixture sets made by the official implementations: ``python -m selfforcing_core.parity DIR``.

DIR is a fixture root in one of the known formats (see ``FORMATS``). Every case is rebuilt from
the files alone, one line is printed per compared tensor with its max abs error, and the exit
code is non-zero when any comparison misses its tolerance.
"""
from pathlib import Path

from .compare import Comparison

FORMAT_MODULES = ("rolling_fixture", "generator_fixture", "taehv_fixture", "wanvae_fixture")


def fixture_formats():
    """Modules with ``detect(root) -> bool`` and ``run(root) -> list[Comparison]``, one per fixture format."""
    import importlib

    return [importlib.import_module(f"{__name__}.{name}") for name in FORMAT_MODULES]


def run_parity(root: Path) -> list[Comparison]:
    """Detect the format of ``root`` and reproduce all its cases."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"parity: {root} is not a directory (pass a fixture root such as ../shared/fixtures/selfforcing)")
    for module in fixture_formats():
        if module.detect(root):
            return module.run(root)
    raise SystemExit(f"parity: {root} is not a known fixture root (expected the layout of "
                     "../shared/fixtures/selfforcing, selfforcing_framewise, causal_forcing, rolling_forcing, taehv or wanvae)")
