"""Latent conventions of Wan 2.1 in one place, plus the streaming API shared by both decoders.

Three latent spaces and layouts meet in this pack:

* **Generator latents** (what the causal Wan generator produces and consumes):
  *normalised* (per channel ``(mu - mean) / std``, roughly unit Gaussian), layout
  ``[B, F, C, H, W]`` (frames before channels, C = 16).
* **ComfyUI LATENT for Wan 2.1** (``{"samples": ...}``): *raw* VAE space (the encoder mean
  as it leaves the VAE, no normalisation), layout ``[B, C, F, H, W]``. ComfyUI's ``Wan21``
  latent format maps raw -> normalised in ``process_in`` and back in ``process_out``.
* **What each decoder consumes**: ``TAEHV`` (``taew2_1``) takes normalised latents;
  ``lighttaew2_1`` takes raw latents; the Wan 2.1 VAE network takes raw latents
  (``conv2`` is its first layer). The codecs below hide this: every public ``decode``
  / ``decode_video`` takes *generator latents* ``[B, F, 16, H, W]`` and returns RGB frames
  ``[B, T, 3, 8H, 8W]`` in ``[0, 1]``; every ``encode`` / ``encode_video`` does the inverse.

Frame counts (both decoders): latent frame 0 -> 1 video frame, every later latent frame -> 4.
"""
from pathlib import Path

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


def _none_if_empty(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None or x.shape[1] == 0 else x


class VideoStream:
    """Block-by-block decoding and encoding with carried state, as TAEHV's ``StreamingTAEHV``.

    Decode (the sampler yields blocks of generator latents)::

        stream = codec.stream()
        for block in blocks:                      # [B, F, 16, h, w], normalised, any F >= 1
            frames = stream.decode(block)         # [B, T, 3, 8h, 8w] in [0, 1]
            show(frames)
        stream.flush()                            # None: decoders never hold frames back

    Encode (frames [B, T, 3, H, W] in [0, 1], any T per call)::

        latents = [stream.encode(chunk) for chunk in chunks]   # each a latent block or None
        latents.append(stream.flush_encoder())                 # pads / drops the tail

    The concatenated output equals ``codec.decode_video`` / ``codec.encode_video`` of the
    whole clip. Call ``reset()`` before a new clip.
    """

    def __init__(self, codec: "StreamingCodec"):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        """Forget all carried state (start of a new clip)."""
        self.decoder_state: dict = {}
        self.encoder_state: dict = {}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Generator latents [B, F, C, h, w] -> the frames they complete, [B, T, 3, 8h, 8w] in [0, 1]."""
        check_video(latents, self.codec.latent_channels, "latents")
        return _none_if_empty(self.codec.decode_chunk(self.codec.cast_input(latents), self.decoder_state))

    def flush(self) -> None:
        """Frames still pending after the last block: always None, both decoders emit a block's
        frames as soon as it arrives (latent 0 -> 1 frame, later latents -> 4)."""
        return None

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor | None:
        """RGB frames [B, T, 3, H, W] in [0, 1] -> the latents they complete [B, F, C, H/8, W/8] or None."""
        check_video(frames, 3, "frames")
        return _none_if_empty(self.codec.encode_chunk(self.codec.cast_input(frames), self.encoder_state))

    @torch.no_grad()
    def flush_encoder(self) -> torch.Tensor | None:
        """Latents of the frames still pending at the end of the clip (codec-specific tail rule)."""
        return _none_if_empty(self.codec.encode_flush(self.encoder_state))


class StreamingCodec(torch.nn.Module):
    """Base of the TAEHV and Wan VAE codecs: whole-clip methods built on the chunk methods.

    Subclasses set ``latent_channels``, ``decode_chunk_frames`` / ``encode_chunk_frames``
    (chunk length used by the whole-clip methods; None = the whole clip at once) and implement
    ``decode_chunk(latents, state)``, ``encode_chunk(frames, state)`` and ``encode_flush(state)``.
    """

    latent_channels = LATENT_CHANNELS
    decode_chunk_frames: int | None = None
    encode_chunk_frames: int | None = None

    def load_exactly(self, state_dict: dict, what: str) -> "StreamingCodec":
        """Load every tensor of ``state_dict`` (no missing or extra keys, same shapes) or raise a
        ValueError that names ``what`` and the offending keys. Returns self."""
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"{what} weights do not match its layout: missing {', '.join(missing[:5]) or 'none'}; "
                             f"unexpected {', '.join(unexpected[:5]) or 'none'}")
        try:
            self.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ValueError(f"{what} weights do not fit its layout: {error}") from None
        return self

    def stream(self) -> VideoStream:
        """A fresh streaming wrapper around this codec."""
        return VideoStream(self)

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input to the codec's device and parameter dtype."""
        weight = next(self.parameters())
        if not (x.is_floating_point()):
            raise TypeError(f"expected a floating-point tensor, got dtype {x.dtype}")
        return x.to(weight.device, weight.dtype)

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Generator latents [B, F, C, h, w] -> frames [B, 1 + 4(F-1), 3, 8h, 8w] in [0, 1]."""
        check_video(latents, self.latent_channels, "latents")
        stream = self.stream()
        step = self.decode_chunk_frames or latents.shape[1]
        frames = [stream.decode(latents[:, i:i + step]) for i in range(0, latents.shape[1], step)]
        return torch.cat([f for f in frames if f is not None], 1)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, T, 3, H, W] in [0, 1] -> generator latents [B, F, C, H/8, W/8] (normalised)."""
        check_video(frames, 3, "frames")
        stream = self.stream()
        step = self.encode_chunk_frames or frames.shape[1]
        latents = [stream.encode(frames[:, i:i + step]) for i in range(0, frames.shape[1], step)]
        latents.append(stream.flush_encoder())
        latents = [x for x in latents if x is not None]
        if not latents:
            raise ValueError(f"{frames.shape[1]} frames are too few to make one latent frame")
        return torch.cat(latents, 1)


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
    from .checkpoint import read_tensors
    from .taehv import TAEHV
    from .wan_vae import WanVAE

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
