"""Detecting and loading a Wan 2.1 codec (TAEHV or the Wan VAE) from a weights file or a state dict."""
from pathlib import Path

import torch

from .checkpoint import read_tensors
from .codec import StreamingCodec
from .taehv import TAEHV
from .wan_vae import WanVAE


def detect_codec(state_dict: dict[str, torch.Tensor]) -> str:
    """'taehv' or 'wan_vae' from the key layout; ValueError naming what was found otherwise."""
    if "decoder.head.2.weight" in state_dict and "conv2.weight" in state_dict:
        return "wan_vae"
    if "decoder.1.weight" in state_dict and "decoder.22.weight" in state_dict:
        return "taehv"
    sample = ", ".join(sorted(state_dict)[:5]) or "(empty)"
    raise ValueError("not a Wan 2.1 decoder: expected the key layout of Wan2.1_VAE.pth / "
                     "wan_2.1_vae.safetensors (decoder.head.2.weight, conv2.weight) or of "
                     f"taew2_1 / lighttaew2_1 (decoder.1.weight ... decoder.22.weight); "
                     f"found {len(state_dict)} keys such as {sample}")


def load_codec(source: str | Path | dict, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", latent_space: str | None = None) -> StreamingCodec:
    """Build the right codec (``TAEHV`` or ``WanVAE``) from a weights file or a state dict.

    ``latent_space`` ('normalised' or 'raw') only matters for TAEHV files: taew2_1 takes
    normalised latents, lighttaew2_1 raw ones; by default it is read from the file name.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported decoder dtype {dtype}: use torch.float32, torch.float16 or torch.bfloat16")

    name = Path(source).name if isinstance(source, (str, Path)) else ""
    state_dict = source if isinstance(source, dict) else read_tensors(source)
    kind = detect_codec(state_dict)
    if kind == "wan_vae":
        codec = WanVAE.from_state_dict(state_dict)
    else:
        codec = TAEHV.from_state_dict(state_dict, latent_space=latent_space or TAEHV.latent_space_for_name(name))
    return codec.to(device=device, dtype=dtype).eval()
