"""The Wan 2.1 VAE (causal 3D convolutions) with a per-layer feature cache for chunked use.

Loads ``Wan2.1_VAE.pth`` and ComfyUI's ``wan_2.1_vae.safetensors`` (identical key names) at any
base width (read from the weight shapes). Every layer works on [B, C, T, H, W] chunks and keeps
what it needs of the past in a ``cache`` dict (keyed by module): a 3-tap causal conv keeps its
last two input frames, the temporal downsample its last frame, the temporal upsample whether
frame 0 has been seen. So a clip decoded chunk by chunk (one latent frame, a 3-frame block, or
all at once) gives the same frames, and decoding never holds more than one chunk's activations
plus these caches. Public methods speak generator latents (see ``latents.py``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .codec import StreamingCodec
from .latents import normalised_to_raw, raw_to_normalised


class CausalConv3d(nn.Conv3d):
    """Conv3d padded with 1 in H and W (3x3 kernels) and, in time, by the cached past frames
    (2 zero frames before frame 0 for a 3-tap kernel)."""

    def __init__(self, n_in: int, n_out: int, kernel: tuple[int, int, int]):
        super().__init__(n_in, n_out, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))

    def forward(self, x, cache: dict):
        past_frames = self.kernel_size[0] - 1
        if past_frames:
            past = cache.get(self)
            if past is None:
                past = x.new_zeros(*x.shape[:2], past_frames, *x.shape[3:])
            x = torch.cat([past, x], 2)
            cache[self] = x[:, :, -past_frames:].clone()
        return super().forward(x)


class RMSNorm(nn.Module):
    """``x / ||x||_2 (over channels) * sqrt(C) * gamma``; no mean, no bias."""

    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.gamma.shape[0] ** 0.5 * self.gamma


def _per_frame(fn, x):
    """Apply a 2-D op to every frame of [B, C, T, H, W]."""
    B, T = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (B, T)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """``conv6(SiLU(norm3(conv2(SiLU(norm0(x)))))) + shortcut(x)`` (keys residual.0/2/3/6, shortcut)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.residual = nn.Sequential(RMSNorm(n_in, 3), nn.SiLU(), CausalConv3d(n_in, n_out, (3, 3, 3)),
                                      RMSNorm(n_out, 3), nn.SiLU(), nn.Identity(),
                                      CausalConv3d(n_out, n_out, (3, 3, 3)))
        self.shortcut = CausalConv3d(n_in, n_out, (1, 1, 1)) if n_in != n_out else None

    def forward(self, x, cache: dict):
        h = x
        for layer in self.residual:
            h = layer(h, cache) if isinstance(layer, CausalConv3d) else layer(h)
        return h + (self.shortcut(x, cache) if self.shortcut is not None else x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, 2)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def _frame(self, x):  # [N, C, H, W]
        N, C, H, W = x.shape
        q, k, v = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(N, C, H, W)
        return self.proj(y) + x

    def forward(self, x, cache: dict):
        return _per_frame(self._frame, x)


class Resample(nn.Module):
    """Spatial x2 up (nearest, conv C -> C/2) or down (pad right/bottom, stride-2 conv), with an
    optional temporal x2 step (``time_conv``) that leaves frame 0 of the clip untouched."""

    def __init__(self, n_in: int, n_out: int, up: bool, temporal: bool):
        super().__init__()
        self.up = up
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(n_in, n_out, 3, padding=1))
            self.time_conv = CausalConv3d(n_in, 2 * n_in, (3, 1, 1)) if temporal else None
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(n_in, n_out, 3, stride=2))
            self.time_conv = nn.Conv3d(n_in, n_in, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def _time_up(self, x, cache):
        """Frames x0..xn -> [x0, u1a, u1b, u2a, ...]: frame 0 passes, later frames double."""
        first = None
        if self not in cache:  # this chunk starts the clip
            cache[self] = True
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            B, C, T, H, W = x.shape
            x = self.time_conv(x, cache).view(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)
        return x if first is None else torch.cat([first, x], 2)

    def _time_down(self, x, cache):
        """Frames y0..y2n -> [y0, tc(y0,y1,y2), tc(y2,y3,y4), ...] (chunks of 1, then even lengths)."""
        first = None
        if self not in cache:
            first = x[:, :, :1]
        else:
            x = torch.cat([cache[self], x], 2)
        cache[self] = x[:, :, -1:].clone()
        y = self.time_conv(x) if x.shape[2] >= 3 else x[:, :, :0]
        return y if first is None else torch.cat([first, y], 2)

    def forward(self, x, cache: dict):
        if self.up and self.time_conv is not None:
            x = self._time_up(x, cache)
        x = _per_frame(self.resample, x)
        if not self.up and self.time_conv is not None:
            x = self._time_down(x, cache)
        return x


def _stage_from(prefix: str, sd: dict, up: bool) -> nn.ModuleList:
    """ResidualBlocks and Resamples of ``{prefix}.{i}`` in index order, sized from ``sd``."""
    blocks, i = [], 0
    while f"{prefix}.{i}.residual.0.gamma" in sd or f"{prefix}.{i}.resample.1.weight" in sd:
        p = f"{prefix}.{i}"
        if f"{p}.residual.0.gamma" in sd:
            w = sd[f"{p}.residual.2.weight"]
            blocks.append(ResidualBlock(w.shape[1], w.shape[0]))
        else:
            w = sd[f"{p}.resample.1.weight"]
            blocks.append(Resample(w.shape[1], w.shape[0], up, temporal=f"{p}.time_conv.weight" in sd))
        i += 1
    return nn.ModuleList(blocks)


class _Coder(nn.Module):
    """Encoder (conv1, downsamples, middle, head) or decoder (conv1, middle, upsamples, head);
    middle = residual, attention, residual."""

    def __init__(self, prefix: str, sd: dict, up: bool):
        super().__init__()
        conv1, head = sd[f"{prefix}.conv1.weight"], sd[f"{prefix}.head.2.weight"]
        width = sd[f"{prefix}.middle.0.residual.0.gamma"].shape[0]
        self.conv1 = CausalConv3d(conv1.shape[1], conv1.shape[0], (3, 3, 3))
        stage = _stage_from(f"{prefix}.{'upsamples' if up else 'downsamples'}", sd, up)
        self.stage_name = "upsamples" if up else "downsamples"
        setattr(self, self.stage_name, stage)
        self.middle = nn.ModuleList([ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width)])
        self.head = nn.Sequential(RMSNorm(head.shape[1], 3), nn.SiLU(), CausalConv3d(head.shape[1], head.shape[0], (3, 3, 3)))

    def forward(self, x, cache: dict):
        x = self.conv1(x, cache)
        stage = list(getattr(self, self.stage_name))
        for block in [*self.middle, *stage] if self.stage_name == "upsamples" else [*stage, *self.middle]:
            x = block(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class WanVAE(StreamingCodec):
    """Wan 2.1 VAE: ``encoder`` + ``conv1`` (mean / log-variance) and ``conv2`` + ``decoder``."""

    decode_chunk_frames = 1  # the whole-clip decode runs latent frame by latent frame
    encode_chunk_frames = 4  # ... and encodes 4 video frames at a time

    def __init__(self, sd: dict):
        super().__init__()
        self.decoder = _Coder("decoder", sd, up=True)
        self.conv2 = CausalConv3d(self.latent_channels, self.latent_channels, (1, 1, 1))
        self.has_encoder = "encoder.conv1.weight" in sd
        if self.has_encoder:
            self.encoder = _Coder("encoder", sd, up=False)
            self.conv1 = CausalConv3d(2 * self.latent_channels, 2 * self.latent_channels, (1, 1, 1))

    @classmethod
    def from_state_dict(cls, sd: dict) -> "WanVAE":
        """Build at the width the weights have and load them strictly (no renaming needed)."""
        for key in ("decoder.conv1.weight", "decoder.head.2.weight", "decoder.middle.0.residual.0.gamma", "conv2.weight"):
            if key not in sd:
                raise ValueError(f"not a Wan 2.1 VAE state dict (Wan2.1_VAE.pth layout): missing {key}")
        z_dim = sd["conv2.weight"].shape[0]
        if z_dim != cls.latent_channels:
            raise ValueError(f"Wan 2.1 VAE has {cls.latent_channels} latent channels, these weights have {z_dim}"
                             " (a Wan 2.2 VAE is not supported)")
        return cls(sd).load_exactly(sd, "Wan 2.1 VAE")

    def decode_raw(self, z_raw: torch.Tensor, cache: dict) -> torch.Tensor:
        """Raw latents [B, 16, F, h, w] (ComfyUI LATENT space) -> unclamped video [B, 3, T, 8h, 8w]
        in about [-1, 1]; the first chunk of a clip gives 1 + 4(F-1) frames, later chunks 4F."""
        return self.decoder(self.conv2(z_raw, cache), cache)

    def encode_mean(self, video: torch.Tensor, cache: dict) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> raw latent mean [B, 16, F, H/8, W/8]. The first
        chunk must hold 1 + 4k frames, later chunks 4k (the clip's frame 0 is encoded alone)."""
        if not self.has_encoder:
            raise ValueError("these Wan VAE weights have no encoder.* keys; they can only decode")
        moments = self.conv1(self.encoder(video, cache), cache)
        return moments[:, :self.latent_channels]

    def decode_chunk(self, latents: torch.Tensor, state: dict) -> torch.Tensor:
        """Generator latents [B, F, 16, h, w] -> frames [B, T, 3, 8h, 8w] in [0, 1]."""
        video = self.decode_raw(normalised_to_raw(latents).transpose(1, 2), state)
        return ((video.clamp(-1, 1) + 1) / 2).transpose(1, 2)

    def encode_chunk(self, frames: torch.Tensor, state: dict) -> torch.Tensor | None:
        """Frames [B, T, 3, H, W] in [0, 1] -> generator latents of the complete chunks, or None.

        Frames are gathered until a chunk is complete (1 frame for the first latent, then 4 each).
        """
        if "pending" in state:
            frames = torch.cat([state.pop("pending"), frames], 1)
        started = state.get("started", False)
        ready = frames.shape[1] - (frames.shape[1] - (0 if started else 1)) % 4
        if ready < frames.shape[1]:
            state["pending"] = frames[:, ready:]
        if ready <= 0:
            return None
        state["started"] = True
        mean = self.encode_mean(frames[:, :ready].transpose(1, 2) * 2 - 1, state)
        return raw_to_normalised(mean.transpose(1, 2))

    def encode_flush(self, state: dict) -> None:
        """Trailing frames that do not complete a chunk of 4 are dropped, as in the official code
        (encode 1 + 4k frames to use them all)."""
        state.pop("pending", None)
        return None
