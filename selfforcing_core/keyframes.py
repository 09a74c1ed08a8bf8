"""Keyframe-conditioned sampling: a start image (image-to-video), an end image and keyframes between.

Time. A clip of F latent frames decodes to 4F - 3 pixel frames (latent 0 -> 1 frame, every later
latent -> 4, both decoders); pixel frame p lies in latent frame ceil(p / 4).

Start image: **whole-block prefill**. The image is encoded as a still clip of
1 + 4 (frames_per_block - 1) frames, i.e. one block of latents, which is written into the cache at
t = 0 before the first generated block (the official prefill / video-extension path, SPEC 4.3) and
returned as the clip's first block. Latent 0 is the image's own first-frame encoding, so the first
decoded frame is the image up to the codec round trip; the clip opens on a still of
4 * frames_per_block - 3 pixel frames (9 at 3 frames per block). Frame-wise plans (Causal
Forcing) and an independent first frame make that block one latent frame: the image alone, with
no still (their image-to-video path); the released chunk-wise checkpoints are not trained for it.

Keyframes at latent frame k with strength s in [0, 1] (the start block holds no keyframes):

* ``guidance``: at every denoising step of the blocks holding frames k - ramp_frames .. k, each of
  those frames' x0 prediction is pulled towards the keyframe latent, ``x0 <- lerp(x0, key, w)``,
  with w = s at k falling linearly to 0 over the ``ramp_frames`` frames before it (the ramp may
  reach into the previous block). At s = 1 frame k is exactly the keyframe latent.
* ``anchor``: before every block that ends before k, the keyframe latent is written into the
  cache at its own future position k (noised to sigma = 1 - s; clean at s = 1), the block attends
  to it while it is denoised, and it is removed again after the block's clean-context pass. In k's
  own block frame k is pinned as in guidance without a ramp. An anchor takes one slot of a rolling
  window while it is in the cache, and is re-encoded under the current prompt for every block.

Strength 0 leaves the rollout untouched (same noise -> the plain streaming sampler's output).
"""
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .images import resize_to
from .model import CausalWanModel
from .generate import GeneratedVideo, generate_video
from .rollout import BlockGuide, RolloutState, StreamSettings
from .units import SPATIAL_FACTOR, latent_frame_of, video_frames_for

METHODS = ("guidance", "anchor")
FIT_MODES = ("crop", "resize", "reject")

# encode(frames [B, T, 3, H, W] in [0, 1]) -> generator latents [B, F, C, H/8, W/8]
# (``StreamingCodec.encode_video`` of TAEHV or the Wan VAE).
Encoder = Callable[[torch.Tensor], torch.Tensor]


def pixel_to_latent_frame(pixel_frame: int, num_latent_frames: int) -> int:
    """Latent frame holding pixel frame ``pixel_frame`` (0-based) of a clip of ``num_latent_frames``."""
    last = video_frames_for(num_latent_frames) - 1
    if not 0 <= pixel_frame <= last:
        raise ValueError(f"keyframe at pixel frame {pixel_frame} is outside the clip: {num_latent_frames} "
                         f"latent frames decode to pixel frames 0..{last}; pick a time in that range "
                         "or make the clip longer")
    return latent_frame_of(pixel_frame)


def fit_images(images: torch.Tensor, height: int, width: int, fit: str = "crop") -> torch.Tensor:
    """Bring images [N, 3, H, W] in [0, 1] to [N, 3, height, width].

    fit: ``crop`` scales to cover and crops the centre (keeps the aspect), ``resize`` stretches,
    ``reject`` raises unless the size already matches.
    """
    if fit not in FIT_MODES:
        raise ValueError(f"image fit must be one of {FIT_MODES}, got {fit!r}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"keyframe images must be [N, 3, H, W] RGB, got shape {tuple(images.shape)}")
    in_height, in_width = images.shape[-2:]
    if fit == "reject" and (in_height, in_width) != (height, width):
        raise ValueError(f"keyframe image is {in_width}x{in_height} but the video is {width}x{height}; "
                         "resize the image to the video size or set the image fit to 'crop' or 'resize'")
    return resize_to(images, height, width, keep_aspect=fit == "crop")


def encode_still(encode: Encoder, image: torch.Tensor, num_latents: int) -> torch.Tensor:
    """Latents [B, num_latents, C, h, w] of a clip holding ``image`` [B, 3, H, W] still for
    1 + 4 (num_latents - 1) frames."""
    frames = image[:, None].expand(-1, video_frames_for(num_latents), -1, -1, -1)
    latents = encode(frames)
    if latents.ndim != 5 or latents.shape[1] < num_latents:
        raise ValueError(f"the encoder turned {frames.shape[1]} frames into shape {tuple(latents.shape)}; "
                         f"expected [B, >= {num_latents}, C, h, w] generator latents")
    return latents[:, :num_latents]


@dataclass
class Keyframe:
    """Where the clip should arrive: ``latent`` [B or 1, C, h, w] (generator latents) at latent
    frame ``latent_frame`` of the clip, with ``strength`` in [0, 1]."""

    latent_frame: int
    latent: torch.Tensor
    strength: float = 1.0


def start_block(encode: Encoder, image: torch.Tensor, frames_per_block: int = 3) -> torch.Tensor:
    """The prefill block of a start image [B, 3, H, W]: [B, frames_per_block, C, h, w]."""
    return encode_still(encode, image, frames_per_block)


def keyframe_from_image(encode: Encoder, image: torch.Tensor, latent_frame: int, strength: float = 1.0) -> Keyframe:
    """Encode image [B, 3, H, W] for ``latent_frame``: frame 0 gets the first-frame encoding, later
    frames the encoding of a latent whose four frames all show the image."""
    latents = encode_still(encode, image, 1 if latent_frame == 0 else 2)
    return Keyframe(latent_frame, latents[:, -1], strength)


def prepare_keyframes(encode: Encoder, latent_hw: tuple[int, int], num_latent_frames: int,
                      start_image: torch.Tensor | None = None, keyframe_images=(), fit: str = "crop",
                      frames_per_block: int = 3, batch_size: int = 1, device=None,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, list[Keyframe]]:
    """Images -> (start block or None, keyframes), checked against a clip of ``num_latent_frames``
    latent frames (start block included).

    start_image: [1, 3, H, W] in [0, 1]. keyframe_images: (pixel_frame, image [1, 3, H, W],
    strength) per keyframe, times in pixel frames of the whole clip. Images are fitted to the
    video size (8 x latent_hw) by ``fit``. Returns the start block [batch_size, fpb, C, h, w];
    latents are moved to ``device`` / ``dtype`` (the generator's).
    """
    height, width = (SPATIAL_FACTOR * size for size in latent_hw)
    start = None
    if start_image is not None:
        start = start_block(encode, fit_images(start_image, height, width, fit), frames_per_block)
        start = start.expand(batch_size, -1, -1, -1, -1).to(device, dtype)
    keyframes = [keyframe_from_image(encode, fit_images(image, height, width, fit),
                                     pixel_to_latent_frame(pixel_frame, num_latent_frames), strength)
                 for pixel_frame, image, strength in keyframe_images]
    for keyframe in keyframes:
        keyframe.latent = keyframe.latent.to(device, dtype)
    latent_shape = (keyframes[0].latent.shape[1], *latent_hw) if keyframes else None
    if latent_shape is not None:
        check_keyframes(keyframes, num_latent_frames, 0 if start is None else start.shape[1], latent_shape)
    return start, keyframes


def check_keyframes(keyframes: list[Keyframe], num_latent_frames: int | None, first_free_frame: int,
                    latent_shape: tuple[int, int, int]):
    """Raise a clear ValueError for keyframes that cannot be honoured.

    first_free_frame: first generated latent frame (after the start block).
    """
    if num_latent_frames is not None and len(keyframes) > num_latent_frames - first_free_frame:
        raise ValueError(f"{len(keyframes)} keyframes but the clip generates only "
                         f"{num_latent_frames - first_free_frame} latent frames; drop keyframes or make "
                         "the clip longer")
    taken = {}
    for index, keyframe in enumerate(keyframes):
        frame = keyframe.latent_frame
        if frame < first_free_frame:
            raise ValueError(f"keyframe {index} at latent frame {frame} falls in the start image's block "
                             f"(pixel frames 0..{video_frames_for(first_free_frame) - 1}); move it later")
        if num_latent_frames is not None and frame >= num_latent_frames:
            raise ValueError(f"keyframe {index} at latent frame {frame} is outside the clip of "
                             f"{num_latent_frames} latent frames")
        if frame in taken:
            raise ValueError(f"keyframes {taken[frame]} and {index} both fall in latent frame {frame} "
                             f"(pixel frames {max(0, 4 * frame - 3)}..{4 * frame}); space them apart")
        taken[frame] = index
        if not 0.0 <= keyframe.strength <= 1.0:
            raise ValueError(f"keyframe {index} strength must be in [0, 1], got {keyframe.strength}")
        if tuple(keyframe.latent.shape[-3:]) != tuple(latent_shape) or keyframe.latent.ndim != 4:
            raise ValueError(f"keyframe {index} latent has shape {tuple(keyframe.latent.shape)}; the video "
                             f"needs [B, {', '.join(map(str, latent_shape))}] (image size 8x the latent size)")


class KeyframeGuide(BlockGuide):
    """Rollout hooks steering towards keyframes by ``guidance`` or ``anchor`` (module docstring)."""

    def __init__(self, keyframes: list[Keyframe], method: str = "guidance", ramp_frames: int = 5):
        if method not in METHODS:
            raise ValueError(f"keyframe method must be one of {METHODS}, got {method!r}")
        if ramp_frames < 0:
            raise ValueError(f"ramp_frames must be >= 0, got {ramp_frames}")
        ramp = ramp_frames if method == "guidance" else 0
        self.pulls: dict[int, tuple[float, torch.Tensor]] = {}  # frame -> (weight, keyframe latent)
        # Latest keyframe first, so a frame in two ramps follows the nearest keyframe after it.
        for keyframe in sorted(keyframes, key=lambda kf: -kf.latent_frame):
            for distance in range(ramp + 1):
                weight = keyframe.strength * (1 - distance / (ramp + 1))
                if weight > 0:
                    self.pulls[keyframe.latent_frame - distance] = (weight, keyframe.latent)
        self.keyframes = list(keyframes)
        self.anchors = [kf for kf in keyframes if method == "anchor" and kf.strength > 0]
        self.cached_anchors: list[int] = []

    def check(self, num_latent_frames: int | None, prefill_frames: int, latent_shape: tuple[int, int, int]):
        check_keyframes(self.keyframes, num_latent_frames, prefill_frames, latent_shape)

    def guide_x0(self, start_frame: int, step: int, x0: torch.Tensor) -> torch.Tensor:
        frames = [(i, self.pulls[start_frame + i]) for i in range(x0.shape[1]) if start_frame + i in self.pulls]
        if not frames:
            return x0
        x0 = x0.clone()
        for i, (weight, latent) in frames:
            x0[:, i] = torch.lerp(x0[:, i], latent.to(x0).expand_as(x0[:, i]), weight)
        return x0

    def before_block(self, model: CausalWanModel, state: RolloutState, start_frame: int, num_frames: int):
        ahead = [kf for kf in self.anchors if kf.latent_frame >= start_frame + num_frames]
        for keyframe in sorted(ahead, key=lambda kf: kf.latent_frame):
            write_anchor(model, state, keyframe)
        self.cached_anchors = [kf.latent_frame for kf in ahead]

    def after_block(self, model: CausalWanModel, state: RolloutState, start_frame: int):
        if self.cached_anchors:
            state.kv_cache.remove_frames(self.cached_anchors)
            self.cached_anchors = []


def write_anchor(model: CausalWanModel, state: RolloutState, keyframe: Keyframe):
    """Write the keyframe latent into the cache at its own frame position, at noise level
    sigma = 1 - strength (fixed noise per frame), under the rollout's current prompt."""
    batch = state.kv_cache.k.shape[1]
    latent = keyframe.latent.to(model.device, torch.float32).expand(batch, -1, -1, -1)[:, None]
    sigma = 1.0 - keyframe.strength
    if sigma > 0:
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(keyframe.latent_frame))
        latent = (1 - sigma) * latent + sigma * noise.to(latent.device)
    t = torch.full((batch, 1), 1000.0 * sigma, device=model.device)
    model(latent, t, state.prompt, kv_cache=state.kv_cache,
          start_frame=keyframe.latent_frame)


def generate_keyframed_video(model: CausalWanModel, prompt: torch.Tensor, latent_frames: int,
                             latent_hw: tuple[int, int], *, encode: Encoder | None,
                             start_image: torch.Tensor | None = None, keyframe_images=(), fit: str = "crop",
                             method: str = "guidance", ramp_frames: int = 5, settings: StreamSettings | None = None,
                             **generate_kwargs) -> GeneratedVideo:
    """``generate.generate_video`` steered by a start image and keyframes (the keyframe sampler).

    latent_frames counts the whole clip, start block included; keyframe times (pixel frames) and
    the blocks of ``settings.prompt_switches`` count from the clip's start too. Images as in
    ``prepare_keyframes``; ``encode`` is needed when there are any. The start block becomes
    ``settings.prefill`` and fills the plan's first block: 3 latent frames (a 9-frame still)
    chunk-wise, one latent frame (the image alone) frame-wise or with an independent first frame.
    Other arguments go to ``generate_video``.
    """
    settings = settings or StreamSettings()
    start_block_frames = settings.first_block_frames or settings.frames_per_block
    if encode is None and (start_image is not None or keyframe_images):
        raise ValueError("keyframe images need an encoder: connect Load Streaming Decoder with Wan VAE or "
                         "TAEHV weights that include the encoder")
    start, keyframes = prepare_keyframes(encode, latent_hw, latent_frames, start_image, keyframe_images, fit,
                                         start_block_frames, prompt.shape[0], model.device, model.dtype)
    start_frames = 0 if start is None else start.shape[1]
    if latent_frames <= start_frames:
        raise ValueError(f"the clip is only {video_frames_for(latent_frames)} frames, which the start image's "
                         f"still block fills; make it at least {video_frames_for(start_frames + 1)} frames long")
    start_blocks = 0 if start is None else 1
    switches = [replace(switch, block=max(0, switch.block - start_blocks)) for switch in settings.prompt_switches]
    return generate_video(model, prompt, latent_frames - start_frames, latent_hw,
                          settings=replace(settings, prefill=start, prompt_switches=switches),
                          guide=KeyframeGuide(keyframes, method, ramp_frames), **generate_kwargs)
