"""The tiny random causal Wan model of tests and small benchmarks (the shape of the parity fixture's model)."""
from dataclasses import replace

import torch

from selfforcing_core.model import CausalWanModel, WanConfig

TINY = WanConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, text_dim=32, text_len=16)


def tiny_model(seed: int = 0, **overrides) -> CausalWanModel:
    """A float32 model with random weights; every parameter non-trivial (LayerNorm affine perturbed)."""
    torch.manual_seed(seed)
    model = CausalWanModel(replace(TINY, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm3.weight") or "norm_" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn_like(param))
    return model.eval().requires_grad_(False)


def tiny_prompt(seed: int = 1, tokens: int = 11, text_dim: int = 32) -> torch.Tensor:
    """Stand-in umT5 output [1, tokens, text_dim]."""
    return torch.randn(1, tokens, text_dim, generator=torch.Generator().manual_seed(seed))
