"""Streaming rollout: generate video latents block by block against the KV cache.

Per block of ``frames_per_block`` latent frames: start from Gaussian noise, run the few-step
sampler (predict x0, re-noise with *fresh* noise to the next timestep, repeat), yield the last x0,
then run the model once more at t = 0 on that clean block so the cache holds clean context.

Latents here are the generator's (normalised) latents, layout [B, F, C, H, W] (frames before
channels); ``latents.py`` converts to what decoders and ComfyUI expect.
"""
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .model import CausalWanModel
from .schedule import DEFAULT_STEPS, FlowMatchSchedule


@dataclass
class NoiseSource:
    """Where the rollout's Gaussian noise comes from.

    Either explicit tensors (``initial`` [B, F_gen, C, H, W] and ``renoise``
    [num_blocks, steps - 1, B, frames_per_block, C, H, W], as the parity fixtures store them) or a
    seeded ``torch.Generator``, from which each block draws its initial noise, then its re-noise,
    in that order (so a stream of any length is reproducible from one seed).
    """

    generator: torch.Generator | None = None
    initial: torch.Tensor | None = None
    renoise: torch.Tensor | None = None

    def block_noise(self, block: int, first_frame: int, shape, dtype, device) -> torch.Tensor:
        if self.initial is not None:
            if first_frame + shape[1] > self.initial.shape[1]:
                raise ValueError(f"noise holds {self.initial.shape[1]} frames; block {block} needs "
                                 f"frames {first_frame}..{first_frame + shape[1] - 1}")
            return self.initial[:, first_frame:first_frame + shape[1]].to(device, dtype)
        return self.draw(shape, dtype, device)

    def step_noise(self, block: int, step: int, shape, dtype, device) -> torch.Tensor:
        if self.renoise is not None:
            return self.renoise[block, step].to(device, dtype)
        return self.draw(shape, dtype, device)

    def draw(self, shape, dtype, device) -> torch.Tensor:
        """Fresh float32 Gaussian noise from the generator (on its device), moved to device / dtype."""
        return torch.randn(shape, generator=self.generator, dtype=torch.float32,
                           device=self.generator.device if self.generator else "cpu").to(device, dtype)


@dataclass
class PromptSwitch:
    """From block ``block`` on, condition on ``prompt`` ([B, L, text_dim])."""

    block: int
    prompt: torch.Tensor


@dataclass
class RolloutState:
    """What the rollout keeps between blocks (exposed to callbacks and tests)."""

    kv_cache: object
    prompt: torch.Tensor
    clean_frames: dict = field(default_factory=dict)  # absolute frame -> [B, C, H, W] clean latent
    frame_blocks: dict = field(default_factory=dict)  # absolute frame -> first frame of its block


class BlockGuide:
    """Hooks that steer a rollout block by block (keyframes use them); this base class changes nothing."""

    def before_block(self, model: CausalWanModel, state: RolloutState, start_frame: int, num_frames: int):
        """Called before the first denoising step of the block at ``start_frame`` (after a prompt switch)."""

    def guide_x0(self, start_frame: int, step: int, x0: torch.Tensor) -> torch.Tensor:
        """The x0 prediction [B, F, C, H, W] that denoising ``step`` continues from (default: unchanged)."""
        return x0

    def after_block(self, model: CausalWanModel, state: RolloutState, start_frame: int):
        """Called after the block's clean-context pass."""


def denoise_block(model: CausalWanModel, schedule: FlowMatchSchedule, timesteps: torch.Tensor,
                  x: torch.Tensor, prompt: torch.Tensor, kv_cache, start_frame: int,
                  step_noise: Callable[[int], torch.Tensor],
                  guide_x0: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Few-step sampling of one block against the cache. x: [B, F, C, H, W] noise -> x0 [B, F, C, H, W].

    guide_x0(step, x0) -> x0, if given, replaces each step's x0 prediction (before re-noising).
    """
    batch, frames = x.shape[:2]
    x0 = x
    for step, t in enumerate(timesteps):
        t_frames = torch.full((batch, frames), float(t), device=x.device)
        flow = model(x.transpose(1, 2), t_frames, prompt, kv_cache=kv_cache, start_frame=start_frame)
        x0 = schedule.x0_from_flow(x, flow.transpose(1, 2), t_frames)
        if guide_x0 is not None:
            x0 = guide_x0(step, x0)
        if step + 1 < len(timesteps):
            next_t = torch.full((batch, frames), float(timesteps[step + 1]), device=x.device)
            x = schedule.add_noise(x0, step_noise(step), next_t)
    return x0


def write_clean_context(model: CausalWanModel, clean: torch.Tensor, prompt: torch.Tensor, kv_cache,
                        start_frame: int, timestep: float = 0.0):
    """Run the model on clean frames [B, F, C, H, W] so the cache holds their keys/values.

    timestep: the t the frames are labelled with (0 = clean; the official ``context_noise``).
    """
    t_context = torch.full(clean.shape[:2], float(timestep), device=clean.device)
    model(clean.transpose(1, 2), t_context, prompt, kv_cache=kv_cache, start_frame=start_frame)


def recache_prompt(model: CausalWanModel, state: RolloutState, context_timestep: float = 0.0):
    """Prompt switch: re-project the new prompt and re-encode the cached clean frames under it.

    The frames still in the cache (sink first, then the most recent ones) are replayed at t = 0 in
    their original blocks and positions, oldest first, into an emptied cache; each replayed group
    attends to the groups replayed before it, exactly as when those frames were first cached.
    """
    cache = state.kv_cache
    frames = list(cache.slot_frames)
    cache.reset()
    groups: list[list[int]] = []
    for frame in frames:  # consecutive cached frames of the same block form one replay group
        if groups and state.frame_blocks[frame] == state.frame_blocks[groups[-1][-1]] and frame == groups[-1][-1] + 1:
            groups[-1].append(frame)
        else:
            groups.append([frame])
    with torch.no_grad():
        for group in groups:
            clean = torch.stack([state.clean_frames[f] for f in group], dim=1)
            write_clean_context(model, clean, state.prompt, cache, group[0], context_timestep)


@torch.no_grad()  # on a generator function: applied around each step, never left on between yields
def stream_blocks(model: CausalWanModel, prompt: torch.Tensor, num_blocks: int | None,
                  latent_shape: tuple[int, int, int], *, noise: NoiseSource,
                  timesteps: torch.Tensor | None = None, schedule: FlowMatchSchedule | None = None,
                  kv_window_frames: int | None = None, sink_frames: int = 0, prefill: torch.Tensor | None = None,
                  prompt_switches: list[PromptSwitch] = (), frames_per_block: int = 3,
                  callback: Callable[[dict], None] | None = None, batch_size: int = 1,
                  kv_cache=None, guide: BlockGuide | None = None,
                  context_timestep: float = 0.0,
                  live_prompt: Callable[[int], torch.Tensor | None] | None = None) -> Iterator[torch.Tensor]:
    """Yield each block's clean latents [B, frames_per_block, C, H, W] as soon as it exists.

    prompt: [B, L, text_dim] umT5 embeddings. num_blocks: blocks to generate, or None for an
    endless stream (needs ``kv_window_frames``). latent_shape: (C, H, W) of one latent frame.
    timesteps: the fed timesteps (default: the shift-5 warped 1000/750/500/250 list).
    kv_window_frames / sink_frames: rolling cache of that many frames with the first
    ``sink_frames`` pinned; None keeps every frame (global cache).
    prefill: clean latents [B, P, C, H, W] written into the cache first (video extension, start
    frames); they are not yielded. prompt_switches: change the prompt at chosen blocks (the
    caches are re-encoded, see ``recache_prompt``). callback: called after every block with
    ``{"block", "num_blocks", "start_frame", "latents", "state"}``; it may raise to stop the stream.
    guide: a ``BlockGuide`` whose hooks run around each block and on each step's x0 (keyframes).
    context_timestep: t of the clean-context pass after each block (0, as released; the official
    ``context_noise`` knob). live_prompt(block) -> [B, L, text_dim] or None: asked before every
    block; a prompt it returns switches there exactly as a scheduled switch (``live.LiveSteering``).
    """
    schedule = schedule or FlowMatchSchedule(5.0)
    guide = guide or BlockGuide()
    timesteps = schedule.warp(DEFAULT_STEPS) if timesteps is None else torch.as_tensor(timesteps)
    if num_blocks is None and kv_window_frames is None:
        raise ValueError("an endless stream needs a rolling KV window (kv_window_frames)")
    weight = model.patch_embedding.weight
    dtype, device = weight.dtype, weight.device
    channels, height, width = latent_shape
    prefill_frames = 0 if prefill is None else prefill.shape[1]
    if kv_cache is None:
        capacity = kv_window_frames or prefill_frames + num_blocks * frames_per_block
        kv_cache = model.new_kv_cache(height, width, capacity, sink_frames, rolling=kv_window_frames is not None,
                                      batch_size=batch_size)
    kv_cache.reset()
    switches = {switch.block: switch.prompt for switch in prompt_switches}
    state = RolloutState(kv_cache, switches.pop(0, prompt).to(device))
    kept_frames = kv_cache.capacity_frames + frames_per_block  # clean latents kept for a re-cache

    def remember(clean: torch.Tensor, start_frame: int):
        for offset in range(clean.shape[1]):
            state.clean_frames[start_frame + offset] = clean[:, offset]
            state.frame_blocks[start_frame + offset] = start_frame
        for frame in [f for f in state.clean_frames if f < start_frame + clean.shape[1] - kept_frames
                      and f >= kv_cache.sink_frames]:
            del state.clean_frames[frame], state.frame_blocks[frame]

    for first in range(0, prefill_frames, frames_per_block):
        group = prefill[:, first:first + frames_per_block].to(device, dtype)
        write_clean_context(model, group, state.prompt, kv_cache, first)
        remember(group, first)

    block = 0
    while num_blocks is None or block < num_blocks:
        start_frame = prefill_frames + block * frames_per_block
        live = live_prompt(block) if live_prompt is not None else None
        if live is not None:
            switches[block] = live
        if block in switches:
            state.prompt = switches.pop(block).to(device)
            recache_prompt(model, state, context_timestep)
        shape = (batch_size, frames_per_block, channels, height, width)
        x = noise.block_noise(block, block * frames_per_block, shape, dtype, device)
        guide.before_block(model, state, start_frame, frames_per_block)
        clean = denoise_block(model, schedule, timesteps, x, state.prompt, kv_cache, start_frame,
                              lambda step: noise.step_noise(block, step, shape, dtype, device),
                              lambda step, x0: guide.guide_x0(start_frame, step, x0))
        write_clean_context(model, clean, state.prompt, kv_cache, start_frame, context_timestep)
        guide.after_block(model, state, start_frame)
        remember(clean, start_frame)
        if callback is not None:
            callback({"block": block, "num_blocks": num_blocks, "start_frame": start_frame,
                      "latents": clean, "state": state})
        yield clean
        block += 1


def sample_video(model: CausalWanModel, prompt: torch.Tensor, num_blocks: int,
                 latent_shape: tuple[int, int, int], **kwargs) -> torch.Tensor:
    """Whole clip: prefill frames (if any) followed by every generated block. -> [B, P + F_gen, C, H, W]."""
    blocks = list(stream_blocks(model, prompt, num_blocks, latent_shape, **kwargs))
    prefill = kwargs.get("prefill")
    if prefill is not None:
        blocks.insert(0, prefill.to(blocks[0].device, blocks[0].dtype))
    return torch.cat(blocks, dim=1)
