"""Streaming rollout: generate video latents block by block against the KV cache.

Per block: start from Gaussian noise, run the few-step sampler (predict x0, re-noise with *fresh*
noise to the next timestep, repeat), yield the last x0, then run the model once more at t = 0 on
that clean block so the cache holds clean context.

Block plans: every block has ``frames_per_block`` latent frames (3 = chunk-wise, 1 = frame-wise),
except that an *independent first frame* (``first_block_frames=1``) makes the first block a single
frame, i.e. blocks [1, 3, 3, ...]. Step lists: the first generated block may use its own list
(``first_block_timesteps``; Causal Forcing's 2- and 1-step models denoise it in 4 steps).

Settings travel as one ``StreamSettings`` value; progress travels as one per-block dict callback.

Latents here are the generator's (normalised) latents, layout [B, F, C, H, W] (frames before
channels); ``latents.py`` converts to what decoders and ComfyUI expect.
"""
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Callable, Iterator

import torch

from .kv_cache import CacheRules
from .model import ROPE_MAX_FRAMES, CausalWanModel
from .schedule import DEFAULT_STEPS, NUM_TRAIN_TIMESTEPS, FlowMatchSchedule


@dataclass
class NoiseSource:
    """Where the rollout's Gaussian noise comes from.

    Either explicit tensors (``initial`` [B, F_gen, C, H, W] and ``renoise`` indexable as
    ``renoise[block][step]`` -> [B, frames of that block, C, H, W], e.g. a tensor
    [num_blocks, steps - 1, B, frames_per_block, C, H, W] as the parity fixtures store it, or nested
    lists when blocks differ in size or step count) or a seeded ``torch.Generator``, from which each
    block draws its initial noise, then its re-noise, in that order (so a stream of any length is
    reproducible from one seed).
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
            return self.renoise[block][step].to(device, dtype)
        return self.draw(shape, dtype, device)

    def draw(self, shape, dtype, device) -> torch.Tensor:
        """Fresh float32 Gaussian noise from the generator (on its device), moved to device / dtype."""
        return torch.randn(shape, generator=self.generator, dtype=torch.float32,
                           device=self.generator.device if self.generator else "cpu").to(device, dtype)


def block_sizes(frames_per_block: int = 3, first_block_frames: int | None = None) -> Iterator[int]:
    """Latent frames of each block, in order: ``first_block_frames`` (if given), then ``frames_per_block`` forever."""
    if frames_per_block < 1 or (first_block_frames is not None and first_block_frames < 1):
        raise ValueError(f"blocks need at least 1 latent frame, got frames_per_block={frames_per_block}, "
                         f"first_block_frames={first_block_frames}")
    if first_block_frames is not None:
        yield first_block_frames
    while True:
        yield frames_per_block


def max_latent_frames(rules: CacheRules, kv_window_frames: int | None, frames_per_block: int = 3,
                      prefill_frames: int = 0) -> int | None:
    """The most latent frames (prefill included) a stream can reach, or None: no limit.

    Block-relativistic RoPE with a rolling window keeps every position inside the window, so such
    a stream runs until stopped. Otherwise frame f sits at position f (with a global cache, slot f
    too): the stream ends with the last whole block inside the model's RoPE table
    (``ROPE_MAX_FRAMES`` positions).
    """
    if rules.rope == "relative" and kv_window_frames:
        return None
    return prefill_frames + (ROPE_MAX_FRAMES - prefill_frames) // frames_per_block * frames_per_block


def blocks_covering(latent_frames: int, frames_per_block: int = 3, first_block_frames: int | None = None) -> int:
    """Blocks of the plan needed to cover ``latent_frames`` frames (the last one may run past the end)."""
    count, total = 0, 0
    for size in block_sizes(frames_per_block, first_block_frames):
        if total >= latent_frames:
            return count
        count, total = count + 1, total + size


def block_plan(latent_frames: int, frames_per_block: int = 3, first_block_frames: int | None = None) -> list[int]:
    """Frames of each block that together make exactly ``latent_frames`` frames ([1, 3, 3] for 7, 3, 1).

    Raises a ValueError naming the nearest lengths that fill whole blocks.
    """
    plan = list(islice(block_sizes(frames_per_block, first_block_frames),
                       blocks_covering(latent_frames, frames_per_block, first_block_frames)))
    total = sum(plan)
    if total != latent_frames:
        raise ValueError(f"{latent_frames} latent frames do not fill whole blocks of the plan {plan[:-1]} + "
                         f"[{plan[-1]}, ...]; use {total - plan[-1]} or {total} latent frames")
    return plan


@dataclass
class PromptSwitch:
    """From block ``block`` on, condition on ``prompt`` ([B, L, text_dim]); ``recache`` changes the
    stream's re-cache fields of ``CacheRules`` for this switch alone (e.g. ``{"switch_recache": "none"}``)."""

    block: int
    prompt: torch.Tensor
    recache: dict = field(default_factory=dict)  # CacheRules fields: switch_recache, global_sink


@dataclass
class StreamSettings:
    """How a stream is generated, passed as one value to ``stream_blocks`` / ``generate_video``.

    Everything but the model, prompt, noise and length. Every field has the released Self Forcing
    default; a new knob is a new field with a default (and a line here).
    """

    kv_window_frames: int | None = None  # rolling KV cache of this many latent frames (sink included); None: keep all
    sink_frames: int = 0  # first frames pinned in the rolling cache (attention sink)
    frames_per_block: int = 3  # block plan: 3 = chunk-wise, 1 = frame-wise (see ``block_sizes``)
    first_block_frames: int | None = None  # 1: independent first frame, blocks [1, 3, 3, ...]
    shift: float = 5.0  # flow-matching schedule shift (5 trained and evaluated; 8 official demo)
    timesteps: torch.Tensor | tuple | None = None  # fed timesteps; None: ``DEFAULT_STEPS`` warped with ``shift``
    first_block_timesteps: torch.Tensor | tuple | None = None  # first generated block's list; None: ``timesteps``
    prefill: torch.Tensor | None = None  # clean latents [B, P, C, H, W] cached first (start frames, extension)
    prompt_switches: list[PromptSwitch] = field(default_factory=list)  # prompt changes at chosen blocks
    context_timestep: float = 0.0  # t of the clean-context pass (the official ``context_noise``)
    cache_rules: CacheRules = CacheRules()  # RoPE placement, sink protection, switch re-cache (see ``CacheRules``)
    sampler: str = "blockwise"  # 'blockwise' (``stream_blocks``) or 'rolling' (``rolling_forcing.stream_rolling``)

    def schedule(self) -> FlowMatchSchedule:
        return FlowMatchSchedule(self.shift)

    def step_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first block's, later blocks') fed timesteps, each [steps] float32."""
        timesteps = self.schedule().warp(DEFAULT_STEPS) if self.timesteps is None else torch.as_tensor(self.timesteps)
        first = timesteps if self.first_block_timesteps is None else torch.as_tensor(self.first_block_timesteps)
        for steps in (first, timesteps):
            if steps.numel() == 0 or (steps <= 0).any() or (steps > NUM_TRAIN_TIMESTEPS).any():
                raise ValueError(f"timesteps must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {steps.tolist()}")
        return first, timesteps


@dataclass
class RolloutState:
    """What the rollout keeps between blocks (exposed to callbacks and tests)."""

    kv_cache: object
    prompt: torch.Tensor
    clean_frames: dict = field(default_factory=dict)  # absolute frame -> [B, C, H, W] clean latent
    frame_blocks: dict = field(default_factory=dict)  # absolute frame -> first frame of its block


class BlockGuide:
    """Hooks that steer a rollout block by block (keyframes use them); this base class changes nothing."""

    def check(self, num_latent_frames: int | None, prefill_frames: int, latent_shape: tuple[int, int, int]):
        """Called once before the stream starts; raises ValueError if the guide cannot be honoured.

        num_latent_frames: the whole clip, prefill included (None: endless).
        """

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
        flow = model(x, t_frames, prompt, kv_cache=kv_cache, start_frame=start_frame)
        x0 = schedule.x0_from_flow(x, flow, t_frames)
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
    model(clean, t_context, prompt, kv_cache=kv_cache, start_frame=start_frame)


def recache_prompt(model: CausalWanModel, state: RolloutState, context_timestep: float = 0.0,
                   recache: dict | None = None):
    """Prompt switch: re-project the new prompt and re-encode the cached clean frames under it,
    by the cache's ``rules.switch_recache`` (``replay_cached_frames``, ``recache_window``, or 'none':
    the cached frames keep the earlier prompt's keys/values, the next call re-projects the prompt).
    ``recache``: ``switch_recache`` / ``global_sink`` of this switch alone (a ``PromptSwitch``'s)."""
    rules = replace(state.kv_cache.rules, **(recache or {}))
    mode = rules.switch_recache
    if mode == "window":
        recache_window(model, state, context_timestep, rules.global_sink)
    elif mode == "replay":
        replay_cached_frames(model, state, context_timestep)
    else:
        state.kv_cache.invalidate_prompt()


def recache_window(model: CausalWanModel, state: RolloutState, context_timestep: float, global_sink: bool):
    """LongLive's switch re-cache: one call over the last ``min(window, S)`` clean frames (S = frames
    generated so far) under the new prompt, all at once (no causal order among them).

    With ``global_sink`` (``CacheRules.global_sink``, or the switch's own) the sink slots keep the first
    prompt's keys/values (the call's leading frames that fall there are not stored); without it the
    cache is zeroed and every slot, the sink included, is re-written.
    """
    cache = state.kv_cache
    end = max(state.clean_frames) + 1
    first = end - min(cache.capacity_frames, end)
    clean = torch.stack([state.clean_frames[f] for f in range(first, end)], dim=1)
    cache.invalidate_prompt()
    if not global_sink:
        cache.zero_()
    with torch.no_grad(), cache.sink_protection(global_sink):
        write_clean_context(model, clean, state.prompt, cache, first, context_timestep)
    cache.invalidate_prompt()


def replay_cached_frames(model: CausalWanModel, state: RolloutState, context_timestep: float = 0.0):
    """The frames still in the cache (sink first, then the most recent ones) are replayed at t = 0 in
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
                  latent_shape: tuple[int, int, int], *, noise: NoiseSource, settings: StreamSettings | None = None,
                  callback: Callable[[dict], None] | None = None, guide: BlockGuide | None = None,
                  live_prompt: Callable[[int], torch.Tensor | None] | None = None, kv_cache=None,
                  batch_size: int | None = None) -> Iterator[torch.Tensor]:
    """Yield each block's clean latents [B, frames of the block, C, H, W] as soon as it exists.

    prompt: [B, L, text_dim] umT5 embeddings. num_blocks: blocks to generate, or None for an
    endless stream (needs ``settings.kv_window_frames``). latent_shape: (C, H, W) of one latent
    frame. settings: window, sink, block plan, step lists, prefill (cached first, not yielded),
    prompt switches (the caches are re-encoded, see ``recache_prompt``) and context timestep.
    With a prefill, the plan's first block is the first prefill group (an image-to-video start
    frame cached alone) and every generated block has ``frames_per_block`` frames.
    callback: called after every block with ``{"block", "num_blocks", "start_frame", "latents",
    "frames", "state"}`` (frames: decoded frames when a decoder runs, see ``generate_video``, else
    None); it may raise to stop the stream. guide: a ``BlockGuide`` whose hooks run around each
    block and on each step's x0 (keyframes). live_prompt(block) -> [B, L, text_dim] or None: asked
    before every block; a prompt it returns switches there exactly as a scheduled switch
    (``live.LiveSteering``). kv_cache: a cache to use instead of a new one (tests, parity); it
    carries its own ``CacheRules``, else ``settings.cache_rules`` apply.
    batch_size: default the prompt's batch.
    """
    settings = settings or StreamSettings()
    guide = guide or BlockGuide()
    schedule = settings.schedule()
    first_timesteps, timesteps = settings.step_lists()
    frames_per_block, first_block_frames = settings.frames_per_block, settings.first_block_frames
    window, prefill = settings.kv_window_frames, settings.prefill
    if num_blocks is None and window is None:
        raise ValueError("an endless stream needs a rolling KV window (kv_window_frames)")
    batch_size = prompt.shape[0] if batch_size is None else batch_size
    dtype, device = model.dtype, model.device
    channels, height, width = latent_shape
    prefill_frames = 0 if prefill is None else prefill.shape[1]
    if prefill is not None and tuple(prefill.shape[2:]) != tuple(latent_shape):
        raise ValueError(f"prefill latents have shape {tuple(prefill.shape)}; the video needs "
                         f"[B, P, {', '.join(map(str, latent_shape))}]")
    generated_first = None if prefill_frames else first_block_frames
    generated_total = None if num_blocks is None else sum(islice(block_sizes(frames_per_block, generated_first),
                                                                 num_blocks))
    guide.check(None if num_blocks is None else prefill_frames + generated_total, prefill_frames, latent_shape)
    if kv_cache is None:
        kv_cache = model.new_kv_cache(height, width, window or prefill_frames + generated_total,
                                      settings.sink_frames, rolling=window is not None, batch_size=batch_size,
                                      rules=settings.cache_rules)
    limit = max_latent_frames(kv_cache.rules, kv_cache.capacity_frames if kv_cache.rolling else None,
                              frames_per_block, prefill_frames)
    if limit is not None and num_blocks is not None and prefill_frames + generated_total > limit:
        raise ValueError(f"{prefill_frames + generated_total} latent frames cannot be reached with absolute RoPE "
                         f"(the model places at most {limit}); generate at most {limit - prefill_frames} frames, "
                         "or use block-relativistic RoPE (rope 'relative') with a KV window for any length")
    kv_cache.reset()
    switches = {switch.block: switch for switch in settings.prompt_switches}
    state = RolloutState(kv_cache, (switches.pop(0).prompt if 0 in switches else prompt).to(device))
    kept_frames = kv_cache.capacity_frames + max(frames_per_block, first_block_frames or 0)  # kept for a re-cache

    def remember(clean: torch.Tensor, start_frame: int):
        for offset in range(clean.shape[1]):
            state.clean_frames[start_frame + offset] = clean[:, offset]
            state.frame_blocks[start_frame + offset] = start_frame
        for frame in [f for f in state.clean_frames if f < start_frame + clean.shape[1] - kept_frames
                      and f >= kv_cache.sink_frames]:
            del state.clean_frames[frame], state.frame_blocks[frame]

    first, prefill_sizes = 0, block_sizes(frames_per_block, first_block_frames)
    while first < prefill_frames:
        group = prefill[:, first:first + next(prefill_sizes)].to(device, dtype)
        write_clean_context(model, group, state.prompt, kv_cache, first)
        remember(group, first)
        first += group.shape[1]

    block, generated_frames, generated_sizes = 0, 0, block_sizes(frames_per_block, generated_first)
    while num_blocks is None or block < num_blocks:
        start_frame = prefill_frames + generated_frames
        num_frames = next(generated_sizes)
        live = live_prompt(block) if live_prompt is not None else None
        if live is not None:
            switches[block] = PromptSwitch(block, live)
        if block in switches:
            switch = switches.pop(block)
            state.prompt = switch.prompt.to(device)
            recache_prompt(model, state, settings.context_timestep, switch.recache)
        shape = (batch_size, num_frames, channels, height, width)
        x = noise.block_noise(block, generated_frames, shape, dtype, device)
        guide.before_block(model, state, start_frame, num_frames)
        clean = denoise_block(model, schedule, first_timesteps if block == 0 else timesteps, x, state.prompt,
                              kv_cache, start_frame,
                              lambda step: noise.step_noise(block, step, shape, dtype, device),
                              lambda step, x0: guide.guide_x0(start_frame, step, x0))
        write_clean_context(model, clean, state.prompt, kv_cache, start_frame, settings.context_timestep)
        guide.after_block(model, state, start_frame)
        remember(clean, start_frame)
        if callback is not None:
            callback({"block": block, "num_blocks": num_blocks, "start_frame": start_frame,
                      "latents": clean, "frames": None, "state": state})
        yield clean
        block += 1
        generated_frames += num_frames


def sample_video(model: CausalWanModel, prompt: torch.Tensor, num_blocks: int,
                 latent_shape: tuple[int, int, int], **stream_kwargs) -> torch.Tensor:
    """Whole clip: prefill frames (if any) followed by every generated block. -> [B, P + F_gen, C, H, W].

    Arguments as ``stream_blocks``.
    """
    blocks = list(stream_blocks(model, prompt, num_blocks, latent_shape, **stream_kwargs))
    settings = stream_kwargs.get("settings")
    if settings is not None and settings.prefill is not None:
        blocks.insert(0, settings.prefill.to(blocks[0].device, blocks[0].dtype))
    return torch.cat(blocks, dim=1)
