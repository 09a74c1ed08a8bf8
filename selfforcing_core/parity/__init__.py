"""Reproduce fixture sets made by the official implementations: ``python -m selfforcing_core.parity DIR``.

DIR is a fixture root in one of the known formats (see ``FORMATS``). Every case is rebuilt from
the files alone, one line is printed per compared tensor with its max abs error, and the exit
code is non-zero when any comparison misses its tolerance.
"""
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Comparison:
    """One compared tensor of one fixture case."""

    case: str
    tensor: str
    max_abs_error: float
    passed: bool

    def line(self) -> str:
        verdict = "ok  " if self.passed else "FAIL"
        return f"{verdict} {self.case:<24} {self.tensor:<28} max_abs_err={self.max_abs_error:.3e}"


def compare(case: str, name: str, actual: torch.Tensor, expected: torch.Tensor,
            atol: float = 1e-4, rtol: float = 1e-4) -> Comparison:
    """Compare two tensors with ``allclose`` semantics; a shape mismatch is a failure."""
    if actual.shape != expected.shape:
        print(f"shape mismatch in {case}/{name}: got {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        return Comparison(case, name, float("inf"), False)
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs()
    passed = bool((error <= atol + rtol * expected.abs()).all())
    return Comparison(case, name, float(error.max()) if error.numel() else 0.0, passed)


def names_architecture(root: Path, marker: str) -> bool:
    """A codec fixture root: ``config.json`` whose ``architecture`` contains ``marker``, next to
    ``weights.safetensors``."""
    import json

    config = root / "config.json"
    return (config.is_file() and (root / "weights.safetensors").is_file()
            and marker in json.loads(config.read_text()).get("architecture", ""))


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
