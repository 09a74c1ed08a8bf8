"""Rolling Forcing (TencentARC, arXiv 2509.25161): a window of blocks denoised jointly, each at its own noise level.

Self Forcing finishes one block (all its steps) before starting the next. Rolling Forcing keeps a
window of ``n`` blocks (n = number of denoising steps) in flight: every window is **one** model
call over all its blocks, the newest at t = tau[0] = 1000 and each older block one level further
on, so the oldest block receives its last step. After the call every block is re-noised (fresh
noise) to its next level, the oldest block leaves the window, and it is cached at t = 0:

    window w:   block w      block w-1    ...   block w-n+1
    level:      0 (t=1000)   1            ...   n-1 (t=tau[n-1]) -> output, cached clean

The clean cache (``RollingForcingCache``) keeps block 0 permanently as an *anchor* and the most
recent clean blocks (24 frames in all). A window's joint call attends to at most 21 frames:
[anchor | the clean blocks just before the window | the window], the anchor re-positioned so that
the positions are contiguous (block 0 "pretends" to sit right before the recent context). The
cache-update call of the oldest block attends to the last 21 cached frames at their own
positions instead. Windows that start at block 0 attend only to themselves.

Window bookkeeping follows the official code exactly, also for videos with fewer blocks than
the window (where it feeds some blocks at levels that do not match their noise; see
``window_levels``). Latents are the generator's, [B, F, C, H, W].
"""
from typing import Callable, Iterator

import torch

from .kv_cache import CacheRules, KVCache, WritePlan
from .model import CausalWanModel, RopeTable, apply_rope
from .rollout import NoiseSource, RolloutState, StreamSettings

CACHE_FRAMES = 24  # clean cache of the release: anchor block + the 7 most recent blocks (3 frames each)
ATTENTION_FRAMES = 21  # frames a call attends to: the model's 21-frame training length


def window_blocks(window: int, num_blocks: int | None, window_size: int) -> tuple[int, int]:
    """(first, last) block of window ``window``: blocks max(0, w - n + 1) .. min(num_blocks - 1, w)."""
    last = window if num_blocks is None else min(num_blocks - 1, window)
    return max(0, window - window_size + 1), last


def window_levels(window: int, first: int, last: int) -> dict[int, int]:
    """Denoising level (index into the step list) of every block of a window.

    Block b is at level ``w - b``; a window that starts at block 0 counts from its *last* block
    (``last - b``), as the official code does. The two agree for every window of a video with at
    least ``n`` blocks; shorter videos keep re-feeding their newest block at level 0 while the
    window cannot grow (the official behaviour, reproduced).
    """
    return {block: (last if first == 0 else window) - block for block in range(first, last + 1)}


def rotate_time(keys: torch.Tensor, rope: RopeTable, frames: int) -> torch.Tensor:
    """Move RoPE-rotated keys ``frames`` positions later in time (their spatial rotation unchanged).

    keys: [B, L, heads, head_dim]; rope: the model's ``RopeTable``. A rotation by the angles of
    position (frames, 0, 0) composes with the stored one. Returns the same shape and dtype.
    """
    return apply_rope(keys, rope.for_grid([frames], 1, 1, keys.device, torch.promote_types(keys.dtype, torch.float32)))


class RollingForcingCache:
    """Clean context of the Rolling Forcing sampler; the ``kv_cache`` of its model calls.

    Storage is a rolling ``KVCache`` of ``cache_frames`` frames whose sink is block 0, written
    only by cache-update calls (clean blocks at t = 0; keys after RoPE at their absolute
    positions). Block 0 is stored at position 0, where the temporal rotation is the identity, so
    "block 0 without RoPE, rotated to position p when attended" is ``rotate_time(stored, p)``.

    Before each model call the sampler says which kind it is (``joint`` or ``update``); the model
    then calls ``begin_call`` / ``store`` / ``cross`` as with a plain ``KVCache``:

    * joint call of a window starting at frame s > 0: keys = [block 0 moved to s - r - b |
      the r cached frames just before s | the window's own keys], with
      r = min(cached non-anchor frames, attention_frames - window frames - b), b = block frames.
    * update call of the block at frame s > 0: written into the cache, then keys = the last
      ``attention_frames`` cached frames (block 0 at its true position if reached).
    * any call starting at frame 0: the call's own keys only.
    """

    def __init__(self, model: CausalWanModel, latent_hw: tuple[int, int], frames_per_block: int = 3,
                 cache_frames: int = CACHE_FRAMES, attention_frames: int = ATTENTION_FRAMES, batch_size: int = 1):
        if attention_frames < 3 * frames_per_block or cache_frames < 2 * frames_per_block:
            raise ValueError(f"attention_frames {attention_frames} and cache_frames {cache_frames} must hold the "
                             f"anchor block, context and a window of {frames_per_block}-frame blocks")
        self.store_cache: KVCache = model.new_kv_cache(*latent_hw, cache_frames, sink_frames=frames_per_block,
                                                       rolling=True, batch_size=batch_size)
        self.frame_seqlen = self.store_cache.frame_seqlen
        self.block_frames = frames_per_block
        self.attention_frames = attention_frames
        self.rope = model.rope
        self.kind = "joint"
        self.start_frame = self.num_frames = 0

    def reset(self):
        self.store_cache.reset()

    def invalidate_prompt(self):
        self.store_cache.invalidate_prompt()

    def call(self, kind: str) -> "RollingForcingCache":
        """Declare the next model call a ``joint`` window call or a cache ``update``; returns self."""
        if kind not in ("joint", "update"):
            raise ValueError(f"unknown Rolling Forcing call kind {kind!r}: use 'joint' or 'update'")
        self.kind = kind
        return self

    rules = CacheRules()  # absolute RoPE: the model rotates keys before ``store``

    def begin_call(self, start_frame: int, num_frames: int) -> WritePlan:
        self.start_frame, self.num_frames = start_frame, num_frames
        self.plan = (self.store_cache.begin_call(start_frame, num_frames) if self.kind == "update"
                     else WritePlan(0, num_frames, 0, 0, position=start_frame))  # joint calls write nothing
        return self.plan

    @torch.compiler.disable
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, rotate) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values a call's queries attend to. k (after RoPE), v: [B, num_frames * fs, heads, head_dim]."""
        fs, anchor = self.frame_seqlen, self.block_frames
        if self.kind == "update":
            cached_k, cached_v = self.store_cache.store(layer, k, v, rotate)
            if self.start_frame == 0:
                return k, v
            keep = min(cached_k.shape[1], self.attention_frames * fs)
            return cached_k[:, -keep:], cached_v[:, -keep:]
        if self.start_frame == 0:
            return k, v
        valid = self.store_cache.num_valid_frames
        cached_k = self.store_cache.k[layer][:, :valid * fs]
        cached_v = self.store_cache.v[layer][:, :valid * fs]
        recent = min(valid - anchor, self.attention_frames - self.num_frames - anchor)
        anchor_position = self.start_frame - recent - anchor
        anchor_k = rotate_time(cached_k[:, :anchor * fs], self.rope, anchor_position)
        recent_k, recent_v = cached_k[:, (valid - recent) * fs:], cached_v[:, (valid - recent) * fs:]
        return (torch.cat([anchor_k, recent_k, k.to(cached_k.dtype)], dim=1),
                torch.cat([cached_v[:, :anchor * fs], recent_v, v.to(cached_v.dtype)], dim=1))

    def cross(self, layer: int, project):
        return self.store_cache.cross(layer, project)


@torch.no_grad()  # on a generator function: applied around each step, never left on between yields
def stream_rolling(model: CausalWanModel, prompt: torch.Tensor, num_blocks: int | None,
                   latent_shape: tuple[int, int, int], *, noise: NoiseSource, settings: StreamSettings | None = None,
                   callback: Callable[[dict], None] | None = None, cache: RollingForcingCache | None = None,
                   batch_size: int | None = None) -> Iterator[torch.Tensor]:
    """Yield each block's final latents [B, frames_per_block, C, H, W] when it leaves the window.

    The signature of ``rollout.stream_blocks``. prompt: [B, L, text_dim]. num_blocks: blocks to
    generate, or None for an endless stream. latent_shape: (C, H, W). settings: the later blocks'
    step list (``settings.step_lists()[1]``: its n fed timesteps make a window of n blocks, every
    block's list; release: 5 steps [1000, 800, 600, 400, 200] warped with shift 5), the schedule's
    shift and frames per block; the sampler takes no prefill, prompt switches or first-block plan,
    and its cache is its own (``kv_window_frames`` and ``sink_frames`` do not apply). noise: ``block_noise(b, ...)``
    gives block b's starting noise; ``step_noise(b, w - b, ...)`` the fresh noise that re-noises
    block b after window w (for a regular video w - b is the block's level, as in Self Forcing).
    callback: called per emitted block with the rollout's dict ``{"block", "num_blocks",
    "start_frame", "latents", "frames", "state"}``; it may raise to stop. cache: a
    ``RollingForcingCache`` of another size (default: the release's 24 frames, 21 attended).
    batch_size: default the prompt's batch. The first block leaves after n windows: time to the
    first frame is n joint calls (growing windows) plus n cache updates.
    """
    settings = settings or StreamSettings(sampler="rolling")
    if settings.prefill is not None or settings.prompt_switches or settings.first_block_frames:
        raise ValueError("the Rolling Forcing sampler takes no prefill, prompt switches or first-block plan; use a "
                         "block-by-block sampler for those")
    schedule, timesteps, frames_per_block = settings.schedule(), settings.step_lists()[1], settings.frames_per_block
    window_size = len(timesteps)
    batch_size = batch_size or prompt.shape[0]
    dtype, device = model.dtype, model.device
    channels, height, width = latent_shape
    shape = (batch_size, frames_per_block, channels, height, width)
    cache = cache or RollingForcingCache(model, (height, width), frames_per_block, batch_size=batch_size)
    if cache.attention_frames < (window_size + 1) * frames_per_block:
        raise ValueError(f"attention_frames {cache.attention_frames} cannot hold the anchor block and a window of "
                         f"{window_size} blocks of {frames_per_block} frames; use at least "
                         f"{(window_size + 1) * frames_per_block}")
    cache.reset()
    state = RolloutState(cache, prompt.to(device))
    starting_noise, noisy, x0 = {}, {}, {}  # per block: its slice of noise, its re-noised latent, its latest x0
    window = 0
    while num_blocks is None or window < num_blocks + window_size - 1:
        first, last = window_blocks(window, num_blocks, window_size)
        levels = window_levels(window, first, last)
        inputs = []
        for block, level in levels.items():
            if level == 0 and block not in starting_noise:
                starting_noise[block] = noise.block_noise(block, block * frames_per_block, shape, dtype, device)
            inputs.append(starting_noise[block] if level == 0 else noisy[block])
        x = torch.cat(inputs, dim=1)
        t = torch.cat([timesteps[level].expand(batch_size, frames_per_block) for level in levels.values()], dim=1)
        flow = model(x, t.to(device), state.prompt, kv_cache=cache.call("joint"),
                     start_frame=first * frames_per_block)
        denoised = schedule.x0_from_flow(x, flow, t).split(frames_per_block, dim=1)
        for (block, level), block_x0 in zip(levels.items(), denoised):
            x0[block] = block_x0
            if level < window_size - 1:
                next_t = timesteps[level + 1].expand(batch_size, frames_per_block)
                noisy[block] = schedule.add_noise(block_x0, noise.step_noise(block, window - block, shape, dtype,
                                                                             device), next_t)
        clean_t = torch.zeros(batch_size, frames_per_block, device=device)
        model(x0[first], clean_t, state.prompt, kv_cache=cache.call("update"),
              start_frame=first * frames_per_block)
        window += 1
        if num_blocks is None or window < num_blocks + window_size - 1:
            if window_blocks(window, num_blocks, window_size)[0] == first:
                continue  # the oldest block stays in the window
        latents = x0.pop(first)
        noisy.pop(first, None), starting_noise.pop(first, None)
        if callback is not None:
            callback({"block": first, "num_blocks": num_blocks, "start_frame": first * frames_per_block,
                      "latents": latents, "frames": None, "state": state})
        yield latents


def sample_rolling(model: CausalWanModel, prompt: torch.Tensor, num_blocks: int,
                   latent_shape: tuple[int, int, int], **kwargs) -> torch.Tensor:
    """Whole clip of ``num_blocks`` blocks from ``stream_rolling``. -> [B, num_blocks * frames_per_block, C, H, W]."""
    return torch.cat(list(stream_rolling(model, prompt, num_blocks, latent_shape, **kwargs)), dim=1)
