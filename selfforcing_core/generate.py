"""Clip-level generation: a whole clip, each block decoded while the next one is generated.

This is the entry point the sampler nodes call: it joins the rollout (``rollout.stream_blocks``)
and a streaming decoder (``codec.VideoStream``), trims whole blocks to the requested length,
and reports every block (latents and decoded frames) to the rollout's per-block dict callback
for progress and previews.
"""
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .live import LiveSteering
from .memory import check_generation_fits, estimate_for_model
from .rollout import BlockGuide, NoiseSource, StreamSettings, blocks_covering, max_latent_frames, stream_blocks
from .rolling_forcing import CACHE_FRAMES, stream_rolling
from .units import pixel_size, video_frames_for


@dataclass
class GeneratedVideo:
    """latents: generator latents [B, F, 16, h, w] (normalised); frames: [B, T, 3, 8h, 8w] in [0, 1] or None;
    report: memory estimate and timings, for people."""

    latents: torch.Tensor
    frames: torch.Tensor | None
    report: str = ""


def cache_and_call_frames(settings: StreamSettings) -> tuple[int | None, int]:
    """(latent frames the KV cache holds, None for a global cache; latent frames of one model call)
    of a run of ``settings``: a block per call, or Rolling Forcing's clean cache and its window of
    blocks denoised in one call."""
    if settings.sampler == "rolling":
        return CACHE_FRAMES, settings.frames_per_block * len(settings.step_lists()[1])
    return settings.kv_window_frames, settings.frames_per_block


def check_endless_has_a_window(latent_frames: int, settings: StreamSettings) -> None:
    """Refuse latent_frames 0 (until stopped) without a rolling window: the cache would grow forever."""
    if latent_frames == 0 and not settings.kv_window_frames:
        raise ValueError("length 0 runs until stopped and needs a rolling KV window: set kv_window_frames "
                         "(e.g. 21)")


def check_video_fits(model, latent_frames: int, latent_hw: tuple[int, int], *, settings: StreamSettings,
                     decoder=None, batch_size: int = 1) -> None:
    """Refuse (``memory.MemoryGuardError``, naming the estimate, the free memory and the fix) a
    ``generate_video`` run that cannot fit, before anything is allocated. latent_frames 0 (until
    stopped) counts the cache's window: the frames kept grow with every block."""
    check_endless_has_a_window(latent_frames, settings)
    cache_frames, call_frames = cache_and_call_frames(settings)
    check_generation_fits(model, *pixel_size(latent_hw), cache_frames, latent_frames or cache_frames,
                          decoder=decoder, batch_size=batch_size, frames_per_block=settings.frames_per_block,
                          call_frames=call_frames)


def generate_video(model, prompt: torch.Tensor, latent_frames: int, latent_hw: tuple[int, int], *, seed: int,
                   settings: StreamSettings | None = None, decoder=None, guide: BlockGuide | None = None,
                   callback: Callable[[dict], None] | None = None, live: LiveSteering | None = None) -> GeneratedVideo:
    """Generate ``latent_frames`` latent frames after the optional ``settings.prefill`` [B, P, 16, h, w].

    latent_frames 0: run until stopped (``live.request_stop()``), which needs a rolling window
    (``settings.kv_window_frames``); with absolute RoPE the stream also ends where the RoPE table
    ends (``rollout.max_latent_frames``), with block-relativistic RoPE (``settings.cache_rules``)
    it never does. live: prompt switches and a stop requested while the stream runs,
    taken at block boundaries; a stop keeps every block generated so far.

    prompt: umT5 embeddings [B, L, 4096]. seed: all noise (initial and re-noise) comes from one
    CPU ``torch.Generator`` seeded with it, so results do not depend on the device. decoder: a
    codec from ``codec_loading.load_codec`` (TAEHV or Wan VAE) or None. callback: the rollout's
    per-block dict (``stream_blocks``), its ``frames`` the block's decoded frames [B, T, 3, H, W]
    (None without a decoder); it may raise (e.g. on a user interrupt) to stop generation.
    settings.sampler 'rolling' runs the Rolling Forcing sampler: a block is output when it leaves
    the window (the first after n windows, reported as the time to the first block); it takes no
    prefill, guide, prompt switches or live steering, and at least a window of blocks.
    Returns the prefill frames followed by the generated ones, trimmed to the requested length.
    """
    settings = settings or StreamSettings()
    prefill, frames_per_block = settings.prefill, settings.frames_per_block
    if settings.sampler not in ("blockwise", "rolling"):
        raise ValueError(f"unknown sampler {settings.sampler!r}: use 'blockwise' or 'rolling'")
    rolling = settings.sampler == "rolling"
    window_blocks = len(settings.step_lists()[1])
    if rolling and (prefill is not None or guide is not None or settings.prompt_switches or live is not None):
        raise ValueError("the Rolling Forcing sampler takes no start image, keyframes or prompt switches; use a "
                         "block-by-block preset for those")
    if latent_frames < 0:
        raise ValueError(f"latent_frames must be >= 1 (or 0: until stopped), got {latent_frames}")
    prefill_frames = 0 if prefill is None else prefill.shape[1]
    endless = latent_frames == 0
    if endless:
        check_endless_has_a_window(latent_frames, settings)
        reachable = max_latent_frames(settings.cache_rules, settings.kv_window_frames, frames_per_block,
                                      prefill_frames)
        latent_frames = None if reachable is None else reachable - prefill_frames
    if rolling and latent_frames is not None and 0 < latent_frames < window_blocks * frames_per_block:
        raise ValueError(f"the Rolling Forcing sampler denoises a window of {window_blocks} blocks; a video shorter "
                         f"than that ({latent_frames} latent frames) is never fully denoised. Make it at least "
                         f"{video_frames_for(window_blocks * frames_per_block)} frames long")
    started = time.perf_counter()
    num_blocks = None if latent_frames is None else blocks_covering(
        latent_frames, frames_per_block, None if prefill_frames else settings.first_block_frames)
    latent_shape = (model.cfg.in_dim, *latent_hw)
    noise = NoiseSource(generator=torch.Generator().manual_seed(seed))
    stream = decoder.stream() if decoder is not None else None
    latents, frames = [], []
    if prefill is not None:
        latents.append(prefill)
        if stream is not None:
            frames.append(stream.decode(prefill))

    def on_block(info: dict):
        info["frames"] = stream.decode(info["latents"]) if stream is not None else None
        if info["frames"] is not None:
            frames.append(info["frames"])
        if callback is not None:
            callback(info)

    if rolling:
        blocks = stream_rolling(model, prompt, num_blocks, latent_shape, noise=noise, settings=settings,
                                callback=on_block)
    else:
        blocks = stream_blocks(model, prompt, num_blocks, latent_shape, noise=noise,
                               settings=settings, callback=on_block, guide=guide,
                               live_prompt=live.take_prompt if live is not None else None)
    generated, ending, first_block_seconds = 0, "", None
    for block, clean in enumerate(blocks):
        first_block_seconds = first_block_seconds or time.perf_counter() - started
        latents.append(clean)
        generated += clean.shape[1]
        if live is not None and (num_blocks is None or block + 1 < num_blocks) and live.take_stop(block + 1):
            ending = f"stopped after block {block + 1} (Stop)\n"
            break
    else:
        if endless:
            ending = (f"the stream reached the end of the model's RoPE table ({prefill_frames + latent_frames} "
                      "latent frames) and stopped there\n")
    total_latent = prefill_frames + (generated if latent_frames is None else min(latent_frames, generated))
    num_blocks = len(latents) - (prefill is not None)
    video = torch.cat(latents, dim=1)[:, :total_latent]
    pixels = torch.cat(frames, dim=1)[:, :video_frames_for(total_latent)] if frames else None
    seconds = time.perf_counter() - started
    cache_frames, call_frames = cache_and_call_frames(settings)
    estimate = estimate_for_model(model, *pixel_size(latent_hw), cache_frames, total_latent, prompt.shape[0], call_frames)
    waits = (f" (a block is output when it leaves the {window_blocks}-block window: the first after "
             f"{window_blocks} window calls)" if rolling else "")
    report = (f"{num_blocks} blocks in {seconds:.1f} s ({seconds / num_blocks:.2f} s per block, "
              f"{video_frames_for(total_latent) / seconds:.2f} video frames/s"
              f"{', decoder included' if decoder is not None else ''})\n"
              f"time to the first block: {first_block_seconds:.2f} s{waits}\n{ending}"
              f"memory estimate (device): {estimate}")
    return GeneratedVideo(video, pixels, report)
