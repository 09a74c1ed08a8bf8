"""Checkpoint families on the causal Wan2.1-1.3B architecture: how each one is sampled.

A ``Family`` says which entry of an official ``.pt`` dict to load, the block plan (frames per
block, an independent first frame), the step lists (the first generated block and the later
ones, configured on the unshifted 1000..1 axis and warped by the schedule's shift), the cache
(window, sink, ``CacheRules``: RoPE mode, sink protection, switch re-cache) and the sampler:
``blockwise`` (``rollout.stream_blocks``: one block through all its steps, then the next) or
``rolling`` (``rolling_forcing.stream_rolling``: a window of blocks denoised jointly at staggered
noise levels). ``FAMILIES`` is keyed by a short id; ``detect_family`` guesses one from a file name,
``loader_family`` takes the loader's choice (that guess by default), ``sampler_family`` the
sampler's preset over it.
"""
import re
from dataclasses import dataclass, replace

from .kv_cache import CacheRules
from .rollout import PromptSwitch, StreamSettings, block_sizes, blocks_covering
from .schedule import DEFAULT_STEPS, FlowMatchSchedule
from .units import video_frames_for


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
    cache_rules: CacheRules = CacheRules()  # RoPE mode, sink protection, switch re-cache (Self Forcing's)
    sampler: str = "blockwise"  # 'blockwise' or 'rolling'
    notes: str = ""

    def overridden(self, frames_per_block: int | None = None, steps: tuple[int, ...] | None = None,
                   kv_window_frames: int | None = None, sink_frames: int | None = None, **rules) -> "Family":
        """This family with settings changed (None keeps the family's); its name says what changed.

        ``steps``: the later blocks' list (the first generated block keeps the family's own);
        ``rules``: ``CacheRules`` fields (rope, protect_sink, switch_recache, global_sink).
        """
        family, changed = self, []
        if frames_per_block is not None and frames_per_block != self.frames_per_block:
            family = replace(family, frames_per_block=frames_per_block)
            changed.append(f"frames per block {frames_per_block}")
        if steps is not None and tuple(steps) != self.steps:
            family = replace(family, steps=tuple(steps), first_block_steps=self.first_block_steps or self.steps)
            changed.append(f"later blocks {len(steps)} steps")
        if kv_window_frames is not None and kv_window_frames != self.kv_window_frames:
            family = replace(family, kv_window_frames=kv_window_frames)
            changed.append(f"window {kv_window_frames}")
        if sink_frames is not None and sink_frames != self.sink_frames:
            family = replace(family, sink_frames=sink_frames)
            changed.append(f"sink {sink_frames}")
        rules = {name: value for name, value in rules.items() if value is not None
                 and value != getattr(self.cache_rules, name)}
        if rules:
            family = replace(family, cache_rules=replace(self.cache_rules, **rules))
            changed += [f"{name} {value}" for name, value in rules.items()]
        return replace(family, name=f"{self.name} ({', '.join(changed)})") if changed else family

    def settings(self, **fields) -> StreamSettings:
        """The ``StreamSettings`` that run this family; ``fields`` (window, prefill, prompt switches, ...) are added."""
        schedule = FlowMatchSchedule(self.shift)
        first = None if self.first_block_steps is None else schedule.warp(self.first_block_steps)
        return StreamSettings(**{
            "kv_window_frames": self.kv_window_frames, "sink_frames": self.sink_frames,
            "frames_per_block": self.frames_per_block, "first_block_frames": self.first_block_frames,
            "shift": self.shift, "timesteps": schedule.warp(self.steps), "first_block_timesteps": first,
            "cache_rules": self.cache_rules, "sampler": self.sampler, **fields})

    def block_of(self, latent_frame: int) -> int:
        """Index of the block (counted from the clip's first frame) that holds ``latent_frame``."""
        return blocks_covering(latent_frame + 1, self.frames_per_block, self.first_block_frames) - 1

    def first_video_frame_of(self, block: int) -> int:
        """The first video frame decoded from ``block`` (its first latent frame L starts at video frame
        4L - 3, which is ``video_frames_for(L)``; L = 0 at frame 0)."""
        sizes = block_sizes(self.frames_per_block, self.first_block_frames)
        return video_frames_for(sum(next(sizes) for _ in range(block)))

    def describe(self) -> str:
        """One line for ``info``: what runs."""
        first = "" if self.first_block_steps is None else f"first block {list(self.first_block_steps)}, later "
        plan = (f"blocks [{self.first_block_frames}, {self.frames_per_block}, ...]" if self.first_block_frames
                else f"{self.frames_per_block} latent frame{'s' * (self.frames_per_block > 1)} per block")
        sampler = (f"rolling window of {len(self.steps)} blocks" if self.sampler == "rolling"
                   else "block by block")
        return (f"{self.name}: {plan}, steps {first}{list(self.steps)} (shift {self.shift:g}), {sampler}, "
                f"{self.describe_cache()}, weights {' or '.join(self.checkpoint_keys)}")

    def describe_cache(self) -> str:
        """The cache part of ``describe``: window and sink, RoPE, sink protection, prompt switches."""
        rules = self.cache_rules
        window = (f"KV window {self.kv_window_frames} frames, sink {self.sink_frames}" if self.kv_window_frames
                  else "global KV cache")
        return (f"{window}, {rules.rope} RoPE{', sink protected' if rules.protect_sink else ''}, "
                f"switches {describe_switch_rule(rules)}")

    def describe_switches(self, switches: list[PromptSwitch]) -> str:
        """Lines for ``info``: each prompt switch (block, first video frame) and the re-cache rule it ran,
        its own (Prompt Schedule) or the stream's; empty without switches."""
        if not switches:
            return ""
        return "\n".join(["prompt switches:"] + [
            f"- block {switch.block} (video frame {self.first_video_frame_of(switch.block)}), "
            f"{'its own rule' if switch.recache else 'the stream rule'}: "
            f"{describe_switch_rule(replace(self.cache_rules, **switch.recache))}" for switch in switches])


def describe_switch_rule(rules: CacheRules) -> str:
    """What a prompt switch re-encodes under ``rules`` (a verb phrase: 'replay the cached frames')."""
    return {"replay": "replay the cached frames",
            "window": f"re-cache the window in one call ({'sink kept' if rules.global_sink else 'sink re-written'})",
            "none": "keep the cached frames (no re-cache)"}[rules.switch_recache]


LONGLIVE_RULES = CacheRules(rope="relative", protect_sink=True, switch_recache="window", global_sink=True)
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
    "longlive": Family(
        "LongLive", checkpoint_keys=("generator", "generator_ema"), kv_window_frames=12, sink_frames=3,
        cache_rules=LONGLIVE_RULES,
        notes="NVlabs LongLive v1.0: longlive_base.pt ('generator') with its rank-256 lora.pt (alpha = rank); "
              "block-relativistic RoPE (infinite attention) keeps every position inside the window"),
    "reward_forcing": Family(
        "Reward Forcing", kv_window_frames=9, sink_frames=3,
        notes="rewardforcing.pt (generator_ema); its EMA-Sink (evicted frames blended into the sink) is not "
              "reproduced: the sink holds the first block"),
    "custom": Family(
        "Custom", notes="Self Forcing's sampling; window, sink, RoPE and switch re-cache as set in the sampler"),
}

# File-name patterns (lower case, '-' and ' ' read as '_'), first match wins.
FILE_NAME_FAMILIES = (
    (r"longlive", "longlive"),
    (r"reward_?forcing", "reward_forcing"),
    (r"rolling_?forcing", "rolling_forcing"),
    (r"causal_?forcing.*frame|framewise.*causal", "causal_forcing_framewise"),
    (r"causal_?forcing", "causal_forcing_chunkwise"),
    (r"self_?forcing", "self_forcing"),
)


def detect_family(file_name: str) -> str | None:
    """Key of ``FAMILIES`` that a checkpoint's file name names (``longlive_base.pt`` -> 'longlive'), or
    None. Only a default: every family shares the architecture and key layout, so the weights
    cannot tell them apart."""
    name = re.sub(r"[-\s]", "_", file_name.lower())
    return next((key for pattern, key in FILE_NAME_FAMILIES if re.search(pattern, name)), None)


def family_of_file(file_name: str) -> tuple[Family, str]:
    """(the family ``detect_family`` finds for a checkpoint's file name, else Self Forcing; a line
    for ``info`` saying where it came from)."""
    key = detect_family(file_name)
    if key is None:
        return FAMILIES["self_forcing"], f"Self Forcing (the file name {file_name} names no family)"
    return FAMILIES[key], f"{FAMILIES[key].name} (from the file name {file_name})"


AUTO_FAMILY = "auto (from file name)"  # the loader's default choice: ``family_of_file``
FAMILY_CHOICES = (AUTO_FAMILY, *(family.name for family in FAMILIES.values()))  # the loader's options, in order


def loader_family(choice: str, file_name: str) -> tuple[Family, str]:
    """(the family a loaded checkpoint runs by default, a line for ``info`` saying where it came from).

    ``choice``: ``AUTO_FAMILY`` (the family the file name names, ``family_of_file``) or a family's
    name, which wins over the file name (the line says what the name suggested).
    """
    if choice == AUTO_FAMILY:
        return family_of_file(file_name)
    family = next((family for family in FAMILIES.values() if family.name == choice), None)
    if family is None:
        raise ValueError(f"family {choice!r} is not one of {', '.join(FAMILY_CHOICES)}")
    suggested = detect_family(file_name)
    name = "names no family" if suggested is None else f"suggests {FAMILIES[suggested].name}"
    return family, f"{family.name} (chosen in the loader; the file name {file_name} {name})"


def sampler_family(preset: Family | None, loaded: Family, origin: str) -> tuple[Family, str]:
    """(the family a sampler runs before its own overrides, a line for ``info`` saying where it came from).

    ``preset``: the sampler's steps preset, None for the model's family; ``loaded``, ``origin``: the
    ``loader_family`` the model carries.
    """
    if preset is None:
        return loaded, f"family: {origin}, from the loaded model"
    return preset, f"family: {preset.name}, the sampler's steps preset (over the loaded model's {origin})"
