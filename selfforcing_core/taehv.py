"""TAEHV, the tiny causal video autoencoder for Wan 2.1 latents (madebyollin/taehv layout).

Loads ``taew2_1.pth`` / ``.safetensors`` and ``lighttaew2_1`` (same key layout, keys
``encoder.N.*`` / ``decoder.N.*`` by nn.Sequential index). Widths are read from the weight
shapes. Frames are processed in parallel inside a chunk; the only state carried between chunks
is each MemBlock's last input and each TPool's incomplete group, so chunked and whole-clip runs
agree exactly. Public methods speak generator latents (see ``latents.py``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .codec import StreamingCodec
from .latents import normalised_to_raw, raw_to_normalised

# Layer kinds by nn.Sequential index (the taew2_1 layout). Parameterless kinds are fixed by
# the layout; parameter shapes give all widths and TPool strides.
DECODER_LAYOUT = ("clamp", "conv", "relu",
                  "mem", "mem", "mem", "up", "grow", "conv",
                  "mem", "mem", "mem", "up", "grow", "conv",
                  "mem", "mem", "mem", "up", "grow", "conv",
                  "relu", "conv")
ENCODER_LAYOUT = ("conv", "relu",
                  "pool", "conv", "mem", "mem", "mem",
                  "pool", "conv", "mem", "mem", "mem",
                  "pool", "conv", "mem", "mem", "mem",
                  "conv")
DECODER_TIME_UPSCALE = (False, True, True)  # per TGrow: stride 2 if True


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """``ReLU(conv3(ReLU(conv2(ReLU(conv1(cat[x, past]))))) + skip(x))``; past = previous frame's input."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * n_in, n_out, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n_out, n_out, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n_out, n_out, 3, padding=1))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merge ``stride`` consecutive frames ([earlier, later] along channels) with a 1x1 conv."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x):  # [B, T, C, H, W] -> [B, T / stride, C, H, W]
        B, T, C, H, W = x.shape
        y = self.conv(x.reshape(B * T // self.stride, self.stride * C, H, W))
        return y.view(B, T // self.stride, C, H, W)


class TGrow(nn.Module):
    """Split each frame into ``stride`` frames with a 1x1 conv (channel chunk j -> frame s*t + j)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x):  # [B, T, C, H, W] -> [B, T * stride, C, H, W]
        B, T, C, H, W = x.shape
        return self.conv(x.reshape(B * T, C, H, W)).view(B, T * self.stride, C, H, W)


def _run_causal(layers: nn.Sequential, x: torch.Tensor, state: dict) -> torch.Tensor | None:
    """Apply ``layers`` to frames x [B, T, C, H, W], time-parallel, carrying ``state`` across calls.

    state[i] holds MemBlock i's last input frame or TPool i's incomplete frame group.
    Returns None when a TPool has not yet gathered a full group.
    """
    for i, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            first_past = state.get(i, torch.zeros_like(x[:, :1]))
            past = torch.cat([first_past, x[:, :-1]], 1)
            state[i] = x[:, -1:].clone()
            B, T = x.shape[:2]
            x = layer(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, (B, T))
        elif isinstance(layer, TPool):
            if i in state:
                x = torch.cat([state.pop(i), x], 1)
            ready = x.shape[1] - x.shape[1] % layer.stride
            if ready < x.shape[1]:
                state[i] = x[:, ready:].clone()
            if ready == 0:
                return None
            x = layer(x[:, :ready])
        elif isinstance(layer, TGrow):
            x = layer(x)
        else:
            B, T = x.shape[:2]
            x = layer(x.flatten(0, 1)).unflatten(0, (B, T))
    return x


def _conv_from(weight: torch.Tensor, has_bias: bool, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride=stride,
                     padding=weight.shape[-1] // 2, bias=has_bias)


def _build(prefix: str, layout: tuple, sd: dict, time_upscale=DECODER_TIME_UPSCALE) -> nn.Sequential:
    """nn.Sequential of ``layout`` with widths read from ``sd`` (keys ``{prefix}.{i}.*``)."""
    layers, grows, strided = [], iter(time_upscale), False
    for i, kind in enumerate(layout):
        key = f"{prefix}.{i}"
        if kind in ("conv", "mem", "pool", "grow"):
            weight_key = {"conv": f"{key}.weight", "mem": f"{key}.conv.0.weight"}.get(kind, f"{key}.conv.weight")
            if weight_key not in sd:
                raise ValueError(f"not a TAEHV (taew2_1 layout) state dict: missing {weight_key}")
            weight = sd[weight_key]
        if kind == "clamp":
            layers.append(Clamp())
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "up":
            layers.append(nn.Upsample(scale_factor=2))
        elif kind == "conv":
            # In the encoder, the conv right after each TPool halves H and W.
            layers.append(_conv_from(weight, f"{key}.bias" in sd, stride=2 if strided else 1))
        elif kind == "mem":
            layers.append(MemBlock(weight.shape[1] // 2, weight.shape[0]))
        elif kind == "pool":
            layers.append(TPool(weight.shape[0], weight.shape[1] // weight.shape[0]))
        elif kind == "grow":
            layers.append(TGrow(weight.shape[1], 2 if next(grows) else 1))
        strided = kind == "pool"
    return nn.Sequential(*layers)


class TAEHV(StreamingCodec):
    """TAEHV encoder + decoder. ``latent_space`` is what the network itself takes and makes:
    'normalised' (taew2_1) or 'raw' (lighttaew2_1); the public methods convert from / to
    generator (normalised) latents."""

    decode_chunk_frames = None  # whole clip in one time-parallel pass (activations O(T))
    encode_chunk_frames = None

    def __init__(self, encoder: nn.Sequential | None, decoder: nn.Sequential, latent_space: str = "normalised"):
        super().__init__()
        if latent_space not in ("normalised", "raw"):
            raise ValueError(f"latent_space must be 'normalised' or 'raw', got {latent_space!r}")
        self.encoder, self.decoder, self.latent_space = encoder, decoder, latent_space
        self.latent_channels = decoder[1].in_channels
        # The decoder makes 2^(stride-2 TGrows) frames per latent; the first latent's extra ones
        # are start-up frames, dropped (3 for taew2_1: latent 0 -> 1 frame).
        self.startup_frames = 2 ** sum(layer.stride == 2 for layer in decoder if isinstance(layer, TGrow)) - 1
        self.t_downscale = 1 if encoder is None else 2 ** sum(
            layer.stride == 2 for layer in encoder if isinstance(layer, TPool))

    @staticmethod
    def latent_space_for_name(file_name: str) -> str:
        """lighttaew2_1 files decode raw VAE latents, taew2_1 normalised ones (ComfyUI and LightX2V
        treat them so; both files have the same key layout, so only the name tells them apart)."""
        return "raw" if "lighttae" in file_name.lower() else "normalised"

    @classmethod
    def from_state_dict(cls, sd: dict, latent_space: str = "normalised") -> "TAEHV":
        """Build and load strictly. A TGrow weight with more output channels than the layout
        expects (an older checkpoint) keeps its trailing channels, as the official loader does."""
        if "decoder.22.weight" not in sd or f"decoder.{len(DECODER_LAYOUT)}.weight" in sd:
            raise ValueError("not a TAEHV (taew2_1 layout) state dict: expected decoder.0 ... decoder.22")
        if sd["decoder.22.weight"].shape[0] != 3:
            raise ValueError(f"TAEHV decoder outputs {sd['decoder.22.weight'].shape[0]} channels; only "
                             "patch size 1 (3 RGB channels: taew2_1, lighttaew2_1) is supported")
        decoder = _build("decoder", DECODER_LAYOUT, sd)
        encoder = _build("encoder", ENCODER_LAYOUT, sd) if "encoder.0.weight" in sd else None
        model = cls(encoder, decoder, latent_space)
        sd = dict(sd)
        for i, layer in enumerate(decoder):
            key = f"decoder.{i}.conv.weight"
            if isinstance(layer, TGrow) and sd[key].shape[0] > layer.conv.out_channels:
                sd[key] = sd[key][-layer.conv.out_channels:]
        return model.load_exactly(sd, "TAEHV (taew2_1)")

    def decode_chunk(self, latents: torch.Tensor, state: dict) -> torch.Tensor:
        """Generator latents [B, F, C, h, w] -> the frames they complete [B, T, 3, 8h, 8w] in [0, 1].

        The first chunk of a clip gives 4F - 3 frames (start-up frames trimmed), later ones 4F.
        """
        if self.latent_space == "raw":
            latents = normalised_to_raw(latents)
        frames = _run_causal(self.decoder, latents, state)
        trim = max(0, self.startup_frames - state.get("frames_done", 0))
        state["frames_done"] = state.get("frames_done", 0) + frames.shape[1]
        return frames[:, trim:].clamp(0, 1)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Network latents [B, F, C, h, w] -> untrimmed, unclamped decoder output [B, 4F, 3, 8h, 8w]."""
        return _run_causal(self.decoder, latents, {})

    def _require_encoder(self):
        if self.encoder is None:
            raise ValueError("this TAEHV state dict has no encoder.* weights; it can only decode")

    def encode_chunk(self, frames: torch.Tensor, state: dict) -> torch.Tensor | None:
        """Frames [B, T, 3, H, W] in [0, 1] -> the latents they complete (one per 4 frames) or None."""
        self._require_encoder()
        state["last_frame"], state["frames_seen"] = frames[:, -1:], state.get("frames_seen", 0) + frames.shape[1]
        latents = _run_causal(self.encoder, frames, state)
        if latents is None or self.latent_space == "normalised":
            return latents
        return raw_to_normalised(latents)

    def encode_flush(self, state: dict) -> torch.Tensor | None:
        """Pad the clip's end by repeating its last frame up to a multiple of 4 and encode the rest."""
        missing = -state.get("frames_seen", 0) % self.t_downscale
        if not missing:
            return None
        return self.encode_chunk(state["last_frame"].repeat_interleave(missing, dim=1), state)
