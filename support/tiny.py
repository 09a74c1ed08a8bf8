"""The tiny random causal Wan models of tests and small benchmarks: their configs, defined once.

* ``TINY``: the unit tests' model (2 heads of 32, 16 text tokens).
* ``HOST_TINY``: the model the ComfyUI host loads in node tests and scripts: head dim 128 as in
  every released Wan2.1 model, so the loader infers the head count itself.
* ``OTHER_TINY``: a shape no fixture set has (3 heads of 16, 8 text tokens): the parity command
  must rebuild any shape from a fixture root's files.
"""
from dataclasses import replace

import torch

from selfforcing_core.config import WanConfig
from selfforcing_core.model import CausalWanModel

TINY = WanConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, text_dim=32, text_len=16)
HOST_TINY = WanConfig(dim=256, ffn_dim=256, num_layers=2, num_heads=2, text_dim=32)
OTHER_TINY = WanConfig(dim=48, ffn_dim=96, num_layers=2, num_heads=3, text_dim=24, text_len=8)


def tiny_model(seed: int = 0, **overrides) -> CausalWanModel:
    """A float32 ``TINY`` model (fields overridable) with random weights; every parameter
    non-trivial (LayerNorm affine perturbed)."""
    torch.manual_seed(seed)
    model = CausalWanModel(replace(TINY, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm3.weight") or "norm_" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn_like(param))
    return model.eval().requires_grad_(False)


def tiny_prompt(seed: int = 1, tokens: int = 11, text_dim: int = TINY.text_dim) -> torch.Tensor:
    """Stand-in umT5 output [1, tokens, text_dim]."""
    return torch.randn(1, tokens, text_dim, generator=torch.Generator().manual_seed(seed))
