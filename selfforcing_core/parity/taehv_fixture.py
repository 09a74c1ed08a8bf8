"""TAEHV fixture format (fixtures/taehv/README.md): weights, NTCHW latents / video, three outputs."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from .compare import Comparison, compare, names_architecture
from ..taehv import TAEHV


def detect(root: Path) -> bool:
    return names_architecture(root, "TAEHV")


@torch.no_grad()
def run(root: Path) -> list[Comparison]:
    """Rebuild the model from weights.safetensors and reproduce decoder_raw, decoded, encoded,
    plus the streamed decode (one latent at a time) against decoded."""
    weights = load_file(str(root / "weights.safetensors"))
    inputs = load_file(str(root / "inputs.safetensors"))
    outputs = load_file(str(root / "outputs.safetensors"))
    model = TAEHV.from_state_dict(weights, latent_space="normalised").eval()
    latents = inputs["latents"]
    stream = model.stream()
    streamed = torch.cat([stream.decode(latents[:, i:i + 1]) for i in range(latents.shape[1])], 1)
    return [
        compare("taehv", "decoder_raw", model.decode_raw(latents), outputs["decoder_raw"]),
        compare("taehv", "decoded", model.decode_video(latents), outputs["decoded"]),
        compare("taehv", "decoded (streamed x1)", streamed, outputs["decoded"]),
        compare("taehv", "encoded", model.encode_video(inputs["video"]), outputs["encoded"]),
    ]
