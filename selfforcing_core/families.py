"""Checkpoint families on the causal Wan2.1-1.3B architecture: how each one is sampled.

A ``Family`` says which entry of an official ``.pt`` dict to load, the block plan (frames per
block, an independent first frame), the step lists (the first generated block and the later
ones, configured on the unshifted 1000..1 axis and warped by the schedule's shift), the cache
(window, sink, RoPE mode) and the sampler: ``blockwise`` (``rollout.stream_blocks``: one block
through all its steps, then the next) or ``rolling`` (``rolling_forcing.stream_rolling``: a
window of blocks denoised jointly at staggered noise levels). ``FAMILIES`` is keyed by a short id.
"""
from dataclasses import dataclass, replace

from .kv_cache import CacheRules
from .rollout import StreamSettings, blocks_covering
from .schedule import DEFAULT_STEPS, FlowMatchSchedule


@dataclass(frozen=True)
class Family:
    """How one released checkpoint family generates (defaults: Self Forcing DMD)."""

    name: str
    checkpoint_keys: tuple[str, ...] = ("generator_ema", "generator")  # preference inside an official .pt dict
    frames_per_block: int = 3  # 3 = chunk-wise, 1 = frame-wise
    first_block_frames: int | None = None  # 1 = independent first frame: blocks [1, 3, 3, ...]
    steps: tuple[int, ...] = DEFAULT_STEPS  # later blocks (configured, before the shift warp)
    first_block_steps: tuple[int, ...] | None = None  # the first generated block (None: ``steps``)
    shift: float = 5.0
    kv_window_frames: int | None = None  # None: keep every frame (global cache)
    sink_frames: int = 0
    rope: str = "absolute"  # 'absolute' (positions from frame 0) or 'relative' (LongLive)
    sampler: str = "blockwise"  # 'blockwise' or 'rolling'
    notes: str = ""

    def overridden(self, frames_per_block: int | None = None, steps: tuple[int, ...] | None = None) -> "Family":
        """This family with another block size or later-block step list (None keeps the family's).

        The first generated block keeps the family's own first-block list.
        """
        family = self
        if frames_per_block is not None and frames_per_block != self.frames_per_block:
            family = replace(family, frames_per_block=frames_per_block, name=f"{family.name} (frames per block "
                                                                             f"{frames_per_block})")
        if steps is not None and tuple(steps) != self.steps:
            family = replace(family, steps=tuple(steps), first_block_steps=self.first_block_steps or self.steps,
                             name=f"{family.name} (later blocks {len(steps)} steps)")
        return family

    def settings(self, **fields) -> StreamSettings:
        """The ``StreamSettings`` that run this family; ``fields`` (window, prefill, prompt switches, ...) are added."""
        schedule = FlowMatchSchedule(self.shift)
        first = None if self.first_block_steps is None else schedule.warp(self.first_block_steps)
        return StreamSettings(**{
            "kv_window_frames": self.kv_window_frames, "sink_frames": self.sink_frames,
            "frames_per_block": self.frames_per_block, "first_block_frames": self.first_block_frames,
            "shift": self.shift, "timesteps": schedule.warp(self.steps), "first_block_timesteps": first,
            "cache_rules": CacheRules(rope=self.rope), "sampler": self.sampler, **fields})

    def block_of(self, latent_frame: int) -> int:
        """Index of the block (counted from the clip's first frame) that holds ``latent_frame``."""
        return blocks_covering(latent_frame + 1, self.frames_per_block, self.first_block_frames) - 1

    def describe(self) -> str:
        """One line for ``info``: what runs."""
        first = "" if self.first_block_steps is None else f"first block {list(self.first_block_steps)}, later "
        plan = (f"blocks [{self.first_block_frames}, {self.frames_per_block}, ...]" if self.first_block_frames
                else f"{self.frames_per_block} latent frame{'s' * (self.frames_per_block > 1)} per block")
        sampler = (f"rolling window of {len(self.steps)} blocks" if self.sampler == "rolling"
                   else "block by block")
        return (f"{self.name}: {plan}, steps {first}{list(self.steps)} (shift {self.shift:g}), {sampler}, "
                f"weights {' or '.join(self.checkpoint_keys)}")


CAUSAL_FORCING_FRAMEWISE = "Causal Forcing frame-wise (generator_ema of the frame-wise checkpoints)"
FAMILIES = {
    "self_forcing": Family("Self Forcing"),
    "self_forcing_first_frame": Family(
        "Self Forcing, independent first frame", first_block_frames=1,
        notes="the official code's independent_first_frame layout; needs a checkpoint trained that way "
              "(none is released for Self Forcing)"),
    "causal_forcing_chunkwise": Family(
        "Causal Forcing chunk-wise", checkpoint_keys=("generator", "generator_ema"),
        notes="thu-ml/Causal-Forcing chunk-wise checkpoint; its README loads 'generator' (no --use_ema)"),
    "causal_forcing_framewise": Family(
        "Causal Forcing frame-wise, 4 steps", frames_per_block=1, notes=CAUSAL_FORCING_FRAMEWISE),
    "causal_forcing_framewise_2step": Family(
        "Causal Forcing frame-wise, 2 steps", frames_per_block=1, steps=(1000, 500),
        first_block_steps=DEFAULT_STEPS, notes=CAUSAL_FORCING_FRAMEWISE + "; Causal Forcing++ 2-step"),
    "causal_forcing_framewise_1step": Family(
        "Causal Forcing frame-wise, 1 step", frames_per_block=1, steps=(1000,),
        first_block_steps=DEFAULT_STEPS, notes=CAUSAL_FORCING_FRAMEWISE + "; Causal Forcing++ 1-step"),
    "rolling_forcing": Family(
        "Rolling Forcing", steps=(1000, 800, 600, 400, 200), sampler="rolling",
        notes="TencentARC rolling_forcing_dmd.pt (generator_ema); a block is output when it leaves the "
              "5-block window"),
    "causal_forcing_long_video": Family(
        "Causal Forcing long video (Rolling Forcing, 4 steps)", sampler="rolling",
        notes="Causal Forcing's long_video configuration: the Rolling Forcing sampler with 4 steps"),
}
