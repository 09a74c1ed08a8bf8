"""Conversions between what users set (pixels, video frames) and what the generator counts.

Wan 2.1's VAE compresses 8x in space and 4x in time (latent frame 0 -> video frame 0, latent
frame k >= 1 -> video frames 4k-3 .. 4k); the DiT patches 2x2 latents into one token, so a
pixel size must be a multiple of 16. Self Forcing generates blocks of 3 latent frames (12 video
frames). Errors say what to set instead.
"""
SPATIAL_FACTOR = 8  # pixels per latent pixel
TEMPORAL_FACTOR = 4  # video frames per latent frame (after the first)
PIXEL_MULTIPLE = 16  # VAE 8x times the DiT's 2x2 patch


def latent_size(width: int, height: int) -> tuple[int, int]:
    """(latent_h, latent_w) for a video of width x height pixels (each a multiple of 16)."""
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % PIXEL_MULTIPLE:
            lower = max(PIXEL_MULTIPLE, value // PIXEL_MULTIPLE * PIXEL_MULTIPLE)
            raise ValueError(f"{name} {value} is not a positive multiple of {PIXEL_MULTIPLE} pixels; "
                             f"use {lower} or {lower + PIXEL_MULTIPLE}")
    return height // SPATIAL_FACTOR, width // SPATIAL_FACTOR


def pixel_size(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) in pixels of a latent of (latent_h, latent_w)."""
    return latent_hw[0] * SPATIAL_FACTOR, latent_hw[1] * SPATIAL_FACTOR


def latent_frames_for(length: int) -> int:
    """Latent frames of a clip of ``length`` video frames (length = 4n + 1)."""
    if length < 1 or (length - 1) % TEMPORAL_FACTOR:
        lower = max(1, (length - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1)
        raise ValueError(f"length {length} is not 4n + 1 video frames; use {lower} or {lower + TEMPORAL_FACTOR}")
    return (length - 1) // TEMPORAL_FACTOR + 1


def video_frames_for(latent_frames: int) -> int:
    """Video frames decoded from ``latent_frames`` latent frames: 1 + 4 (F - 1)."""
    return 1 + TEMPORAL_FACTOR * (latent_frames - 1) if latent_frames > 0 else 0


def latent_frame_of(video_frame: int) -> int:
    """The latent frame whose decode contains ``video_frame`` (0 -> 0, 1..4 -> 1, 5..8 -> 2, ...)."""
    if video_frame < 0:
        raise ValueError(f"video frame index must be >= 0, got {video_frame}")
    return (video_frame + TEMPORAL_FACTOR - 1) // TEMPORAL_FACTOR


def blocks_for(latent_frames: int, frames_per_block: int = 3) -> int:
    """Blocks needed to cover ``latent_frames`` (the last block may run past the end; trim it)."""
    return -(-latent_frames // frames_per_block)


def block_of_video_frame(video_frame: int, frames_per_block: int = 3) -> int:
    """The block whose latent frames contain ``video_frame`` (blocks of ``frames_per_block`` latent frames)."""
    return latent_frame_of(video_frame) // frames_per_block


def whole_block_latent_frames(length: int, frames_per_block: int = 3) -> int:
    """Latent frames of a clip of ``length`` video frames that must fill whole blocks (training windows)."""
    latent_frames = latent_frames_for(length)
    if latent_frames % frames_per_block:
        lengths = ", ".join(str(video_frames_for(frames_per_block * n)) for n in range(1, 8))
        raise ValueError(f"length {length} is {latent_frames} latent frames, not whole blocks of {frames_per_block}; "
                         f"use one of {lengths}, ...")
    return latent_frames
