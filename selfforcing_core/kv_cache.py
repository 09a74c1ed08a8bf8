"""Key/value cache of the causal generator: what earlier blocks left for the next one to read.

Contract (the official Self Forcing cache rule, stated per latent frame, with LongLive's options):

* The cache holds, per transformer layer, the self-attention keys and values of up to
  ``capacity_frames`` latent frames, oldest first, plus the cross-attention keys/values of the
  projected prompt.
* A call for frames ``[start_frame, start_frame + n)`` that ends at the newest cached frame
  *re-computes* them: it overwrites the last ``n`` slots (the denoising steps of a block and its
  clean-context pass; LongLive's switch re-cache of the whole window in one call).
* A call for new frames *appends* them. If that would overflow a rolling cache, the oldest
  frames after the first ``sink_frames`` are evicted and the remaining ones slide left (they keep
  their keys). A global cache (``rolling=False``) refuses to overflow.
* The queries of a call attend to every valid slot, its own freshly written frames included.
* ``rules.rope``: ``absolute`` (Self Forcing, LongLive v1.0) caches keys after RoPE at their
  absolute frame index; ``relative`` (block-relativistic RoPE, LongLive's infinite attention)
  caches keys before RoPE and places every slot at its slot index (sink 0..sink-1, then the
  window in order, the call's own frames last; queries at their slots), so positions never leave
  ``[0, capacity_frames)`` and a stream has no length limit. Rotated keys are kept beside the
  raw ones: only slots that moved (after an eviction: once per block) or were written are rotated.
* ``rules.protect_sink`` (LongLive): a re-computation that starts after frame 0 never writes the
  sink slots; its leading frames that fall there are computed but not stored. The attended range
  then always covers the sink slots (zero until written).
* ``reset()`` empties both caches; ``invalidate_prompt()`` drops only the cross-attention part
  so the next call re-projects the (new) prompt.

Buffers are allocated once, so memory stays flat for any number of blocks with a rolling window.
"""
import contextlib
from dataclasses import dataclass

import torch

ROPE_MODES = ("absolute", "relative")
SWITCH_RECACHES = ("replay", "window", "none")


@dataclass(frozen=True)
class CacheRules:
    """How a stream places, protects and re-encodes its cached frames (defaults: Self Forcing)."""

    rope: str = "absolute"  # 'absolute' | 'relative' (block-relativistic, see the module docstring)
    protect_sink: bool = False  # LongLive: re-computations never write the sink slots
    # After a prompt switch: 'replay' re-encodes the cached frames block by block into an emptied
    # cache; 'window' (LongLive) runs one call over the last window of clean frames; 'none' keeps
    # the cached keys/values of the earlier prompt (only the cross-attention moves to the new one).
    switch_recache: str = "replay"
    global_sink: bool = True  # 'window' re-cache: the sink keeps the first prompt's K/V (False: re-written)

    def __post_init__(self):
        if self.rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {self.rope!r}")
        if self.switch_recache not in SWITCH_RECACHES:
            raise ValueError(f"switch_recache must be one of {SWITCH_RECACHES}, got {self.switch_recache!r}")


@dataclass
class WritePlan:
    """Where one model call writes: its frames sit at slots ``[first_slot, first_slot + num_frames)``;
    the first ``skipped_frames`` of them are not stored (protected sink)."""

    first_slot: int
    num_frames: int
    evicted_frames: int  # frames dropped after the sink before writing (rolling caches only)
    valid_frames: int  # frames the call's queries attend to, after the write
    position: int  # temporal RoPE position of the call's first frame (its queries and keys)
    skipped_frames: int = 0

    def written_tokens(self, frame_seqlen: int) -> tuple[int, int]:
        """Token range ``[lo, hi)`` of the cache that this call overwrites."""
        return ((self.first_slot + self.skipped_frames) * frame_seqlen,
                (self.first_slot + self.num_frames) * frame_seqlen)


def check_window(kv_window_frames: int | None, sink_frames: int, frames_per_block: int = 3) -> None:
    """Raise a ValueError naming the fix unless a rolling window of ``kv_window_frames`` latent
    frames (0 or None: no window) with ``sink_frames`` pinned has room for a block."""
    if kv_window_frames and kv_window_frames - sink_frames < frames_per_block:
        raise ValueError(f"kv_window_frames {kv_window_frames} with sink_frames {sink_frames} leaves no room for "
                         f"a block of {frames_per_block} frames; use kv_window_frames >= sink_frames + "
                         f"{frames_per_block} (21 is the usual window)")


class KVCache:
    """Self- and cross-attention cache for ``num_layers`` layers of the causal Wan generator."""

    def __init__(self, num_layers: int, frame_seqlen: int, num_heads: int, head_dim: int,
                 capacity_frames: int, sink_frames: int = 0, rolling: bool = False,
                 batch_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", rules: CacheRules = CacheRules()):
        if capacity_frames < 1:
            raise ValueError(f"KV cache capacity must be at least 1 latent frame, got {capacity_frames}")
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(f"sink_frames must be in [0, {capacity_frames}) for a cache of "
                             f"{capacity_frames} frames, got {sink_frames}")
        self.frame_seqlen = frame_seqlen
        self.capacity_frames = capacity_frames
        self.sink_frames = sink_frames
        self.rolling = rolling
        self.rules = rules
        self.protect_sink = rules.protect_sink
        shape = (num_layers, batch_size, capacity_frames * frame_seqlen, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # raw keys in 'relative' mode
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_rotated = torch.zeros(shape, dtype=dtype, device=device) if rules.rope == "relative" else None
        self.rotated_slots = [0] * num_layers  # per layer: slots [0, n) of k_rotated are current
        self.cross_k: list[torch.Tensor | None] = [None] * num_layers
        self.cross_v: list[torch.Tensor | None] = [None] * num_layers
        self.slot_frames: list[int] = []  # absolute latent-frame index held by each slot
        self.plan: WritePlan | None = None

    def reset(self):
        """Forget every cached frame and the prompt projection (start of a new video)."""
        self.slot_frames = []
        self.plan = None
        self.rotated_slots = [0] * len(self.rotated_slots)
        if self.rules.protect_sink:  # unwritten sink slots are attended as zeros
            self.zero_()
        self.invalidate_prompt()

    def zero_(self):
        """Zero every cached key and value (slots and bookkeeping unchanged)."""
        for buffer in (self.k, self.v, self.k_rotated):
            if buffer is not None:
                buffer.zero_()

    def invalidate_prompt(self):
        """Drop the cross-attention keys/values; the next call re-projects the prompt."""
        self.cross_k = [None] * len(self.cross_k)
        self.cross_v = [None] * len(self.cross_v)

    @contextlib.contextmanager
    def sink_protection(self, protect: bool):
        """Within the block, re-computations write the sink slots (``protect=False``) or not."""
        saved, self.protect_sink = self.protect_sink, protect
        try:
            yield self
        finally:
            self.protect_sink = saved

    @property
    def num_valid_frames(self) -> int:
        return len(self.slot_frames)

    def _stale_rotations_from(self, slot: int):
        self.rotated_slots = [min(done, slot) for done in self.rotated_slots]

    def begin_call(self, start_frame: int, num_frames: int) -> WritePlan:
        """Plan where a model call for frames ``[start_frame, start_frame + num_frames)`` writes.

        Called once per model call before layer 0; ``store`` then applies the plan per layer.
        """
        frames = list(range(start_frame, start_frame + num_frames))
        cached = self.slot_frames
        if cached and frames[-1] == cached[-1] and num_frames <= len(cached):  # re-computation
            first = len(cached) - num_frames
            skipped = 0
            if self.protect_sink and start_frame > 0:
                skipped = min(max(self.sink_frames - first, 0), num_frames)
            self.slot_frames = cached[:first + skipped] + frames[skipped:]
            evicted = 0
        else:
            if any(f in cached for f in frames):
                raise ValueError(f"frames {frames[0]}..{frames[-1]} overlap cached frames "
                                 f"{cached[0]}..{cached[-1]} without ending at the newest one; blocks "
                                 "must be written in order (reset() to start a new video)")
            evicted = max(len(cached) + num_frames - self.capacity_frames, 0)
            if evicted and not self.rolling:
                raise ValueError(
                    f"the global KV cache holds {self.capacity_frames} latent frames and is full; "
                    f"set kv_window_frames (a rolling window) to generate longer videos")
            if evicted and evicted > len(cached) - self.sink_frames:
                raise ValueError(f"a block of {num_frames} frames does not fit a window of "
                                 f"{self.capacity_frames} frames with {self.sink_frames} sink frames")
            sink = self.sink_frames
            self.slot_frames = cached[:sink] + cached[sink + evicted:] + frames
            first, skipped = len(self.slot_frames) - num_frames, 0
            if evicted:
                self._stale_rotations_from(sink)
        valid = len(self.slot_frames)
        if self.protect_sink:
            valid = max(valid, self.sink_frames)
        position = first if self.rules.rope == "relative" else start_frame
        self.plan = WritePlan(first, num_frames, evicted, valid, position, skipped)
        return self.plan

    def remove_frames(self, frames: list[int]):
        """Forget the cached ``frames`` (temporary context such as keyframe anchors); the slots after
        them slide left, keeping their keys and their order (relative RoPE re-places them)."""
        keep = [slot for slot, frame in enumerate(self.slot_frames) if frame not in frames]
        fs = self.frame_seqlen
        tokens = (torch.tensor(keep, device=self.k.device)[:, None] * fs
                  + torch.arange(fs, device=self.k.device)).reshape(-1)
        for buffer in (self.k, self.v):
            buffer[:, :, :len(tokens)] = buffer[:, :, tokens]
        moved = next((i for i, slot in enumerate(keep) if slot != i), len(keep))
        self._stale_rotations_from(moved)
        self.slot_frames = [self.slot_frames[slot] for slot in keep]
        self.plan = None

    def attended_keys(self, layer: int) -> torch.Tensor:
        """The keys queries read (RoPE applied): [B, capacity tokens, heads, head_dim]."""
        return self.k[layer] if self.k_rotated is None else self.k_rotated[layer]

    # Cache bookkeeping runs eagerly under torch.compile: its Python ints (layer, write plan) would
    # otherwise be baked into the compiled block graphs and force a recompile per layer and block.
    @torch.compiler.disable
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, rotate) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values by the current plan and return the valid cache.

        k, v: [B, num_frames * frame_seqlen, heads, head_dim]; k after RoPE at ``plan.position``
        with absolute RoPE, before RoPE with relative RoPE.
        rotate(keys, first_position) -> keys with RoPE for frames at positions first_position, ...
        Returns (keys with RoPE, values): [B, valid_frames * frame_seqlen, heads, head_dim].
        """
        plan, fs = self.plan, self.frame_seqlen
        k_layer, v_layer = self.k[layer], self.v[layer]
        if plan.evicted_frames:
            # Slide the kept non-sink frames left over the evicted ones.
            sink, gone = self.sink_frames * fs, plan.evicted_frames * fs
            kept_end = plan.first_slot * fs + gone
            for buffer in (k_layer, v_layer):
                buffer[:, sink:kept_end - gone] = buffer[:, sink + gone:kept_end].clone()
        rotated = k if self.k_rotated is None else rotate(k, plan.position)
        lo, hi = plan.written_tokens(fs)
        skip = plan.skipped_frames * fs
        v_layer[:, lo:hi] = v[:, skip:].detach().to(v_layer.dtype)
        if self.k_rotated is None:
            k_layer[:, lo:hi] = rotated[:, skip:].detach().to(k_layer.dtype)
        else:
            k_layer[:, lo:hi] = k[:, skip:].detach().to(k_layer.dtype)
            done = self.rotated_slots[layer] * fs
            if done < lo:  # slots that moved since they were rotated: re-place them once
                self.k_rotated[layer][:, done:lo] = rotate(k_layer[:, done:lo], done // fs)
            self.k_rotated[layer][:, lo:hi] = rotated[:, skip:].detach().to(k_layer.dtype)
            self.rotated_slots[layer] = max(self.rotated_slots[layer], hi // fs)
        keys, end = self.attended_keys(layer), plan.valid_frames * fs
        if k.requires_grad or v.requires_grad:
            # Training: gradients flow through this call's own keys/values only; the cached
            # context is detached and the buffers never hold autograd state.
            return (torch.cat([keys[:, :lo], rotated[:, skip:].to(keys.dtype), keys[:, hi:end]], dim=1),
                    torch.cat([v_layer[:, :lo], v[:, skip:].to(v_layer.dtype), v_layer[:, hi:end]], dim=1))
        return keys[:, :end], v_layer[:, :end]

    @torch.compiler.disable
    def cross(self, layer: int, project):
        """Cross-attention keys/values of ``layer``, projected by ``project()`` on first use."""
        if self.cross_k[layer] is None:
            self.cross_k[layer], self.cross_v[layer] = project()
        return self.cross_k[layer], self.cross_v[layer]
