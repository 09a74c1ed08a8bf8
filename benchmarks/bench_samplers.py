"""Samplers side by side: chunk-wise 4-step, frame-wise 4/2/1-step (Causal Forcing), Rolling Forcing.

Prints figures; asserts nothing. Usage (heavy: wrap in ``flock /tmp/heavy.lock``):
    python -m benchmarks.bench_samplers [--config 1.3b|tiny] [--layers N] [--latent 8x8] [--latent-frames 15]

* Timing: one run per sampler of ``--latent-frames`` latent frames with random weights in the
  real architecture (``--layers`` keeps the real width with fewer layers), fp32, warm (one
  throw-away block first). Time to the first output latent frame and the steady time per latent
  frame (from the first output to the last, divided by the latent frames after the first).
* Work: FLOPs per output video frame of each sampler at 480x832 for an 81-frame clip (21 latent
  frames), counted by torch's FlopCounterMode on fake tensors of the real 1.3B model. The call
  pattern (query frames, attended key frames per call) is recorded by running each sampler's own
  code on a tiny model, then every call is counted at the real size.
"""
import argparse
import time
from collections import Counter
from dataclasses import replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_flops import cpu_attention_flops  # noqa: F401  (registers the CPU attention formula)
from selfforcing_core.config import WAN_T2V_1P3B, WanConfig
from selfforcing_core.families import FAMILIES
from selfforcing_core.kv_cache import CacheRules, WritePlan
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import NoiseSource, blocks_covering, stream_blocks
from selfforcing_core.rolling_forcing import RollingForcingCache, stream_rolling
from selfforcing_core.units import video_frames_for
from support.tiny import TINY
SAMPLERS = {
    "chunk-wise, 4 steps (Self Forcing)": FAMILIES["self_forcing"],
    "frame-wise, 4 steps (Causal Forcing)": FAMILIES["causal_forcing_framewise"],
    "frame-wise, 2 steps (Causal Forcing++)": FAMILIES["causal_forcing_framewise_2step"],
    "frame-wise, 1 step (Causal Forcing++)": FAMILIES["causal_forcing_framewise_1step"],
    "Rolling Forcing (5-step window)": FAMILIES["rolling_forcing"],
}


def stream(model, family, prompt, latent_frames: int, latent_hw, seed: int, cache=None):
    """The family's sampler as a stream of output blocks [1, F, 16, h, w]."""
    settings = family.settings()
    noise = NoiseSource(torch.Generator().manual_seed(seed))
    num_blocks = blocks_covering(latent_frames, family.frames_per_block, family.first_block_frames)
    if family.sampler == "rolling":
        return stream_rolling(model, prompt, num_blocks, (16, *latent_hw), noise=noise, settings=settings, cache=cache)
    return stream_blocks(model, prompt, num_blocks, (16, *latent_hw), noise=noise, settings=settings, kv_cache=cache)


def timed(model, family, prompt, latent_frames: int, latent_hw) -> tuple[float, float]:
    """(seconds to the first output latent frame, steady seconds per latent frame)."""
    started = time.perf_counter()
    stamps, frames = [], []
    for block in stream(model, family, prompt, latent_frames, latent_hw, seed=1):
        stamps.append(time.perf_counter() - started)
        frames.append(block.shape[1])
    steady = (stamps[-1] - stamps[0]) / max(sum(frames[1:]), 1)
    return stamps[0], steady


def call_pattern(family, latent_frames: int, latent_hw) -> Counter:
    """(query frames, attended key frames) -> number of model calls, from the sampler's own code on a tiny model."""
    torch.manual_seed(0)
    model = CausalWanModel(TINY).eval().requires_grad_(False)
    prompt = torch.zeros(1, TINY.text_len, TINY.text_dim)
    num_frames = latent_frames + 3
    if family.sampler == "rolling":
        cache = RollingForcingCache(model, latent_hw, family.frames_per_block)
    else:
        cache = model.new_kv_cache(*latent_hw, capacity_frames=num_frames)
    frame_seqlen, calls, store = model.frame_seqlen(*latent_hw), Counter(), cache.store

    def recording_store(layer, k, v, rotate):
        keys, values = store(layer, k, v, rotate)
        if layer == 0:
            calls[(k.shape[1] // frame_seqlen, keys.shape[1] // frame_seqlen)] += 1
        return keys, values

    cache.store = recording_store
    for _ in stream(model, family, prompt, latent_frames, latent_hw, seed=0, cache=cache):
        pass
    return calls


class FixedKeys:
    """A stand-in cache for counting: every call attends to ``key_frames`` frames of (fake) keys and
    to the text keys/values ``cross_kv`` (layer -> (k, v)), projected once per clip as the cache does."""

    rules = CacheRules()

    def __init__(self, key_frames: int, frame_seqlen: int, cross_kv: dict):
        self.key_tokens, self.cross_kv = key_frames * frame_seqlen, cross_kv

    def begin_call(self, start_frame, num_frames):
        self.plan = WritePlan(0, num_frames, 0, num_frames, position=start_frame)
        return self.plan

    def store(self, layer, k, v, rotate):
        shape = (k.shape[0], self.key_tokens, *k.shape[2:])
        return k.new_zeros(shape), v.new_zeros(shape)

    def cross(self, layer, project):
        return self.cross_kv[layer]


def flops_per_video_frame(calls: Counter, latent_frames: int, cfg: WanConfig = WAN_T2V_1P3B,
                          latent_hw=(60, 104)) -> float:
    """Counted FLOPs of the recorded calls at the real size, per output video frame: every call,
    plus the text embedding and cross-attention text projections once per clip (without gradients,
    as the samplers run)."""
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        model = CausalWanModel(cfg).eval().requires_grad_(False)
        prompt = torch.zeros(1, cfg.text_len, cfg.text_dim)
        frame_seqlen = model.frame_seqlen(*latent_hw)
        with FlopCounterMode(display=False) as text:
            context = model.embed_text(prompt)
            cross_kv = {layer: block.cross_attn.project_context(context) for layer, block in enumerate(model.blocks)}
        total = text.get_total_flops()
        for (query_frames, key_frames), count in calls.items():
            with FlopCounterMode(display=False) as counter:
                model(torch.zeros(1, query_frames, cfg.in_dim, *latent_hw), torch.zeros(1, query_frames), prompt,
                      kv_cache=FixedKeys(key_frames, frame_seqlen, cross_kv), start_frame=0)
            total += count * counter.get_total_flops()
    return total / video_frames_for(latent_frames)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("1.3b", "tiny"), default="1.3b")
    parser.add_argument("--layers", type=int, help="layers of the real width (default: all)")
    parser.add_argument("--latent", default="8x8", help="latent H x W of the timing runs")
    parser.add_argument("--latent-frames", type=int, default=15, help="latent frames of each timed run")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()

    print("FLOPs per video frame at 480x832, 81 frames (21 latent frames), real 1.3B, counted on fake tensors:")
    for label, family in SAMPLERS.items():
        calls = call_pattern(family, 21, (4, 4))
        print(f"  {label:<40} {flops_per_video_frame(calls, 21) / 1e12:6.2f} TFLOP/frame  "
              f"({sum(calls.values())} model calls)")
    if args.skip_timing:
        return
    cfg = WAN_T2V_1P3B if args.config == "1.3b" else TINY
    cfg = replace(cfg, num_layers=args.layers or cfg.num_layers)
    latent_hw = tuple(int(n) for n in args.latent.split("x"))
    torch.manual_seed(0)
    model = CausalWanModel(cfg).eval().requires_grad_(False)
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim)
    print(f"\ntiming: dim {cfg.dim}, {cfg.num_layers} layers, latent {latent_hw[0]}x{latent_hw[1]}, "
          f"{args.latent_frames} latent frames, fp32, {torch.get_num_threads()} threads, one run each (warm):")
    next(stream(model, FAMILIES["self_forcing"], prompt, 3, latent_hw, seed=0))  # warm: one throw-away block
    print(f"  {'sampler':<40} first latent frame   steady per latent frame")
    for label, family in SAMPLERS.items():
        first, steady = timed(model, family, prompt, args.latent_frames, latent_hw)
        print(f"  {label:<40} {first:10.2f} s {steady:16.2f} s")


if __name__ == "__main__":
    main()
