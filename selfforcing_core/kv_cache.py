"""Key/value cache of the causal generator: what earlier blocks left for the next one to read.

Contract (the official Self Forcing cache rule, stated per latent frame):

* The cache holds, per transformer layer, the self-attention keys (after RoPE, at their absolute
  frame positions) and values of up to ``capacity_frames`` latent frames, oldest first, plus the
  cross-attention keys/values of the projected prompt.
* A call for frames ``[start_frame, start_frame + n)`` that are already the newest frames in the
  cache *overwrites* their slots (the denoising steps of a block and its clean-context pass).
* A call for new frames *appends* them. If that would overflow a rolling cache, the oldest
  frames after the first ``sink_frames`` are evicted and the remaining ones slide left (they keep
  their keys; nothing is re-rotated). A global cache (``rolling=False``) refuses to overflow.
* The queries of a call attend to every valid slot, its own freshly written frames included.
* ``reset()`` empties both caches; ``invalidate_prompt()`` drops only the cross-attention part
  so the next call re-projects the (new) prompt.

Buffers are allocated once, so memory stays flat for any number of blocks with a rolling window.
"""
from dataclasses import dataclass

import torch


@dataclass
class WritePlan:
    """Where one model call writes: slots ``[first_slot, first_slot + num_frames)``."""

    first_slot: int
    num_frames: int
    evicted_frames: int  # frames dropped after the sink before writing (rolling caches only)
    valid_frames: int  # frames the call's queries attend to, after the write


class KVCache:
    """Self- and cross-attention cache for ``num_layers`` layers of the causal Wan generator."""

    def __init__(self, num_layers: int, frame_seqlen: int, num_heads: int, head_dim: int,
                 capacity_frames: int, sink_frames: int = 0, rolling: bool = False,
                 batch_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if capacity_frames < 1:
            raise ValueError(f"KV cache capacity must be at least 1 latent frame, got {capacity_frames}")
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(f"sink_frames must be in [0, {capacity_frames}) for a cache of "
                             f"{capacity_frames} frames, got {sink_frames}")
        self.frame_seqlen = frame_seqlen
        self.capacity_frames = capacity_frames
        self.sink_frames = sink_frames
        self.rolling = rolling
        shape = (num_layers, batch_size, capacity_frames * frame_seqlen, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cross_k: list[torch.Tensor | None] = [None] * num_layers
        self.cross_v: list[torch.Tensor | None] = [None] * num_layers
        self.slot_frames: list[int] = []  # absolute latent-frame index held by each slot
        self.plan: WritePlan | None = None

    def reset(self):
        """Forget every cached frame and the prompt projection (start of a new video)."""
        self.slot_frames = []
        self.plan = None
        self.invalidate_prompt()

    def invalidate_prompt(self):
        """Drop the cross-attention keys/values; the next call re-projects the prompt."""
        self.cross_k = [None] * len(self.cross_k)
        self.cross_v = [None] * len(self.cross_v)

    @property
    def num_valid_frames(self) -> int:
        return len(self.slot_frames)

    def begin_call(self, start_frame: int, num_frames: int) -> WritePlan:
        """Plan where a model call for frames ``[start_frame, start_frame + num_frames)`` writes.

        Called once per model call before layer 0; ``store`` then applies the plan per layer.
        """
        frames = list(range(start_frame, start_frame + num_frames))
        newest = self.slot_frames[-num_frames:] if len(self.slot_frames) >= num_frames else None
        if newest == frames:  # another pass over the newest block: overwrite in place
            self.plan = WritePlan(len(self.slot_frames) - num_frames, num_frames, 0, len(self.slot_frames))
            return self.plan
        if any(f in self.slot_frames for f in frames):
            raise ValueError(f"frames {frames[0]}..{frames[-1]} overlap cached frames "
                             f"{self.slot_frames[0]}..{self.slot_frames[-1]} without being the newest "
                             "block; blocks must be written in order (reset() to start a new video)")
        overflow = len(self.slot_frames) + num_frames - self.capacity_frames
        evicted = max(overflow, 0)
        if evicted and not self.rolling:
            raise ValueError(
                f"the global KV cache holds {self.capacity_frames} latent frames and is full; "
                f"set kv_window_frames (a rolling window) to generate longer videos")
        if evicted and evicted > len(self.slot_frames) - self.sink_frames:
            raise ValueError(f"a block of {num_frames} frames does not fit a window of "
                             f"{self.capacity_frames} frames with {self.sink_frames} sink frames")
        sink = self.sink_frames
        self.slot_frames = self.slot_frames[:sink] + self.slot_frames[sink + evicted:] + frames
        self.plan = WritePlan(len(self.slot_frames) - num_frames, num_frames, evicted, len(self.slot_frames))
        return self.plan

    def remove_frames(self, frames: list[int]):
        """Forget the cached ``frames`` (temporary context such as keyframe anchors); the slots after
        them slide left, keeping their keys (nothing is re-rotated) and their order."""
        keep = [slot for slot, frame in enumerate(self.slot_frames) if frame not in frames]
        fs = self.frame_seqlen
        tokens = (torch.tensor(keep, device=self.k.device)[:, None] * fs
                  + torch.arange(fs, device=self.k.device)).reshape(-1)
        for buffer in (self.k, self.v):
            buffer[:, :, :len(tokens)] = buffer[:, :, tokens]
        self.slot_frames = [self.slot_frames[slot] for slot in keep]
        self.plan = None

    # Cache bookkeeping runs eagerly under torch.compile: its Python ints (layer, write plan) would
    # otherwise be baked into the compiled block graphs and force a recompile per layer and block.
    @torch.compiler.disable
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values by the current plan and return the valid cache.

        k, v: [B, num_frames * frame_seqlen, heads, head_dim] (k after RoPE).
        Returns (keys, values): [B, valid_frames * frame_seqlen, heads, head_dim] views.
        """
        plan, fs = self.plan, self.frame_seqlen
        k_layer, v_layer = self.k[layer], self.v[layer]
        if plan.evicted_frames:
            # Slide the kept non-sink frames left over the evicted ones.
            sink, gone = self.sink_frames * fs, plan.evicted_frames * fs
            kept_end = plan.first_slot * fs + gone
            for buffer in (k_layer, v_layer):
                buffer[:, sink:kept_end - gone] = buffer[:, sink + gone:kept_end].clone()
        lo, hi = plan.first_slot * fs, (plan.first_slot + plan.num_frames) * fs
        k_layer[:, lo:hi] = k.detach().to(k_layer.dtype)
        v_layer[:, lo:hi] = v.detach().to(v_layer.dtype)
        end = plan.valid_frames * fs
        if k.requires_grad or v.requires_grad:
            # Training: gradients flow through this call's own keys/values only; the cached
            # context is detached and the buffers never hold autograd state.
            return (torch.cat([k_layer[:, :lo], k.to(k_layer.dtype), k_layer[:, hi:end]], dim=1),
                    torch.cat([v_layer[:, :lo], v.to(v_layer.dtype), v_layer[:, hi:end]], dim=1))
        return k_layer[:, :end], v_layer[:, :end]

    @torch.compiler.disable
    def cross(self, layer: int, project):
        """Cross-attention keys/values of ``layer``, projected by ``project()`` on first use."""
        if self.cross_k[layer] is None:
            self.cross_k[layer], self.cross_v[layer] = project()
        return self.cross_k[layer], self.cross_v[layer]
