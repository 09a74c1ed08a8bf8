"""Wan 2.1 VAE fixture format (fixtures/wanvae/README.md): weights, NCTHW video / latents, five outputs."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from .compare import Comparison, compare, names_architecture
from ..latents import normalised_to_raw, raw_to_normalised
from ..wan_vae import WanVAE


def detect(root: Path) -> bool:
    return names_architecture(root, "WanVAE_")


@torch.no_grad()
def run(root: Path) -> list[Comparison]:
    """Rebuild the VAE from weights.safetensors and reproduce the encoder and decoder outputs,
    the decode both whole-clip (one chunk) and streamed (one latent frame, then 3-frame blocks)."""
    weights = load_file(str(root / "weights.safetensors"))
    inputs = load_file(str(root / "inputs.safetensors"))
    outputs = load_file(str(root / "outputs.safetensors"))
    model = WanVAE.from_state_dict(weights).eval()
    video, latents = inputs["video"], inputs["latents"]  # N, C, T, H, W
    mu = model.encode_mean(video, {})
    z_raw = normalised_to_raw(latents, channel_dim=1)
    results = [
        compare("wanvae", "encoder_out", model.encoder(video, {}), outputs["encoder_out"]),
        compare("wanvae", "encode_mu", mu, outputs["encode_mu"]),
        compare("wanvae", "encode_latents", raw_to_normalised(mu, channel_dim=1), outputs["encode_latents"]),
        compare("wanvae", "encode_video (streamed)", model.encode_video(video.transpose(1, 2) / 2 + 0.5),
                outputs["encode_latents"].transpose(1, 2)),
        compare("wanvae", "latents_raw", z_raw, inputs["latents_raw"]),
        compare("wanvae", "decode_raw", model.decode_raw(z_raw, {}), outputs["decode_raw"]),
    ]
    expected_frames = outputs["decode_chunked"].transpose(1, 2) / 2 + 0.5  # NTCHW in [0, 1]
    for block in (1, 3):
        stream = model.stream()
        frames = [stream.decode(latents[:, :, i:i + block].transpose(1, 2)) for i in range(0, latents.shape[2], block)]
        results.append(compare("wanvae", f"decode_chunked (blocks of {block})", torch.cat(frames, 1), expected_frames))
    return results
