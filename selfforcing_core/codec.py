"""The streaming codec API shared by both decoders: ``StreamingCodec`` (base class) and ``VideoStream``.

A codec (``taehv.TAEHV``, ``wan_vae.WanVAE``; built from a file by ``codec_loading.load_codec``)
speaks generator latents [B, F, 16, h, w] and RGB frames [B, T, 3, 8h, 8w] in [0, 1] (see
``latents.py`` for the conventions); a ``VideoStream`` feeds it one block at a time.
"""
import torch

from .latents import LATENT_CHANNELS, check_video


def _none_if_empty(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None or x.shape[1] == 0 else x


class VideoStream:
    """Block-by-block decoding *or* encoding of one clip with carried state, as TAEHV's ``StreamingTAEHV``.

    Decode (the sampler yields blocks of generator latents)::

        stream = codec.stream()
        for block in blocks:                      # [B, F, 16, h, w], normalised, any F >= 1
            frames = stream.decode(block)         # [B, T, 3, 8h, 8w] in [0, 1]
            show(frames)
        stream.flush()                            # frames still pending (None: decoders never hold any back)

    Encode (frames [B, T, 3, H, W] in [0, 1], any T per call)::

        stream = codec.stream()
        latents = [stream.encode(chunk) for chunk in chunks]   # each a latent block or None
        latents.append(stream.flush())                         # the tail: padded (TAEHV) or dropped (Wan VAE)

    ``flush()`` ends the clip in both directions: it returns what is still pending (or None) and
    resets the stream. The concatenated output equals ``codec.decode_video`` /
    ``codec.encode_video`` of the whole clip. A stream does one direction per clip.
    """

    def __init__(self, codec: "StreamingCodec"):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        """Forget all carried state (start of a new clip)."""
        self.direction: str | None = None  # "decode" or "encode" once the clip has started
        self.state: dict = {}

    def _start(self, direction: str):
        if self.direction not in (None, direction):
            raise ValueError(f"this stream {self.direction}s a clip; flush() it or use another codec.stream() "
                             f"to {direction}")
        self.direction = direction

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Generator latents [B, F, C, h, w] -> the frames they complete, [B, T, 3, 8h, 8w] in [0, 1]."""
        check_video(latents, self.codec.latent_channels, "latents")
        self._start("decode")
        return _none_if_empty(self.codec.decode_chunk(self.codec.cast_input(latents), self.state))

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor | None:
        """RGB frames [B, T, 3, H, W] in [0, 1] -> the latents they complete [B, F, C, H/8, W/8] or None."""
        check_video(frames, 3, "frames")
        self._start("encode")
        return _none_if_empty(self.codec.encode_chunk(self.codec.cast_input(frames), self.state))

    @torch.no_grad()
    def flush(self) -> torch.Tensor | None:
        """End the clip: what is still pending (decode: frames, encode: latents by the codec's tail
        rule) or None; the stream is reset for the next clip."""
        flush = {"decode": self.codec.decode_flush, "encode": self.codec.encode_flush}.get(self.direction)
        pending = None if flush is None else _none_if_empty(flush(self.state))
        self.reset()
        return pending


class StreamingCodec(torch.nn.Module):
    """Base of the TAEHV and Wan VAE codecs: whole-clip methods built on the chunk methods.

    Subclasses set ``latent_channels``, ``decode_chunk_frames`` / ``encode_chunk_frames``
    (chunk length used by the whole-clip methods; None = the whole clip at once) and implement
    ``decode_chunk(latents, state)``, ``encode_chunk(frames, state)`` and ``encode_flush(state)``
    (``decode_flush(state)`` too if a decoder ever holds frames back; both of ours emit a block's
    frames as soon as it arrives: latent 0 -> 1 frame, later latents -> 4).
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

    def decode_flush(self, state: dict) -> torch.Tensor | None:
        """Frames still pending at the end of a decoded clip: none."""
        return None

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
        latents.append(stream.flush())
        latents = [x for x in latents if x is not None]
        if not latents:
            raise ValueError(f"{frames.shape[1]} frames are too few to make one latent frame")
        return torch.cat(latents, 1)
