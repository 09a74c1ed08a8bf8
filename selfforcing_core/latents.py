"""Latent conventions of Wan 2.1 in one place: statistics, spaces, layouts and their checks.

Three latent spaces and layouts meet in this pack:

* **Generator latents** (what the causal Wan generator produces and consumes):
  *normalised* (per channel ``(mu - mean) / std``, roughly unit Gaussian), layout
  ``[B, F, C, H, W]`` (frames before channels, C = 16).
* **ComfyUI LATENT for Wan 2.1** (``{"samples": ...}``): *raw* VAE space (the encoder mean
  as it leaves the VAE, no normalisation), layout ``[B, C, F, H, W]``. ComfyUI's ``Wan21``
  latent format maps raw -> normalised in ``process_in`` and back in ``process_out``.
* **What each decoder consumes**: ``TAEHV`` (``taew2_1``) takes normalised latents;
  ``lighttaew2_1`` takes raw latents; the Wan 2.1 VAE network takes raw latents
  (``conv2`` is its first layer). The codecs (``codec.py``) hide this: every public ``decode``
  / ``decode_video`` takes *generator latents* ``[B, F, 16, H, W]`` and returns RGB frames
  ``[B, T, 3, 8H, 8W]`` in ``[0, 1]``; every ``encode`` / ``encode_video`` does the inverse.

Frame counts (both decoders): latent frame 0 -> 1 video frame, every later latent frame -> 4.
"""
import torch

# Per-channel statistics of the Wan 2.1 VAE latent space (official ``WanVAE``; bit-equal to
# ComfyUI's ``latent_formats.Wan21``).
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
LATENT_CHANNELS = len(WAN21_LATENT_MEAN)


def _channel_stats(latents: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) in float32 (as the official code builds them), shaped to broadcast."""
    if latents.shape[channel_dim] != LATENT_CHANNELS:
        raise ValueError(f"Wan 2.1 latents need {LATENT_CHANNELS} channels on dim {channel_dim}, "
                         f"got shape {tuple(latents.shape)}")
    shape = [1] * latents.ndim
    shape[channel_dim] = LATENT_CHANNELS
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32).view(shape)
    inv_std = (1.0 / torch.tensor(WAN21_LATENT_STD, dtype=torch.float32)).view(shape)
    return mean.to(latents.device, latents.dtype), inv_std.to(latents.device, latents.dtype)


def normalised_to_raw(latents: torch.Tensor, channel_dim: int = 2) -> torch.Tensor:
    """Generator (normalised) latents -> raw VAE latents: ``z * std + mean`` per channel.

    ``channel_dim`` is 2 for generator layout [B, F, C, H, W], 1 for ComfyUI [B, C, F, H, W].
    """
    mean, inv_std = _channel_stats(latents, channel_dim)
    return latents / inv_std + mean


def raw_to_normalised(latents: torch.Tensor, channel_dim: int = 2) -> torch.Tensor:
    """Raw VAE latents (encoder mean, ComfyUI LATENT values) -> normalised: ``(mu - mean) / std``."""
    mean, inv_std = _channel_stats(latents, channel_dim)
    return (latents - mean) * inv_std


def generator_to_comfy(latents: torch.Tensor) -> torch.Tensor:
    """Generator latents [B, F, C, H, W] (normalised) -> ComfyUI LATENT samples [B, C, F, H, W] (raw)."""
    check_video(latents, LATENT_CHANNELS, "generator latents")
    return normalised_to_raw(latents, channel_dim=2).transpose(1, 2).contiguous()


def comfy_to_generator(samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI LATENT samples [B, C, F, H, W] (raw) -> generator latents [B, F, C, H, W] (normalised)."""
    if samples.ndim != 5 or samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected a Wan 2.1 ComfyUI LATENT [B, {LATENT_CHANNELS}, F, H, W], "
                         f"got shape {tuple(samples.shape)}")
    return raw_to_normalised(samples, channel_dim=1).transpose(1, 2).contiguous()


def check_video(x: torch.Tensor, channels: int, what: str) -> None:
    """Raise a clear ValueError unless ``x`` is [B, T, channels, H, W] (time before channels)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 5:
        raise ValueError(f"{what} must be 5-D [B, T, {channels}, H, W], got shape {tuple(x.shape)}")
    if x.shape[2] == channels:
        return
    if x.shape[1] == channels:
        raise ValueError(f"{what} look like [B, C, T, H, W] (shape {tuple(x.shape)}); this API takes "
                         f"[B, T, {channels}, H, W]: pass x.transpose(1, 2)")
    raise ValueError(f"{what} must have {channels} channels on dim 2 ([B, T, {channels}, H, W]), "
                     f"got shape {tuple(x.shape)}")
