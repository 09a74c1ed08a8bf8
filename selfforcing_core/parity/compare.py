"""One compared tensor of a fixture case (``Comparison``, ``compare``) and the codec fixture-root check."""
import json
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
    config = root / "config.json"
    return (config.is_file() and (root / "weights.safetensors").is_file()
            and marker in json.loads(config.read_text()).get("architecture", ""))
