"""Generator benchmark: cached rollout vs recomputing the history, and a long rolling-window stream.

Prints figures; asserts nothing. Usage:
    python -m benchmarks.bench_generator [--config tiny|1.3b] [--latent 8x8] [--blocks 6] [--long-blocks 120]

* cached vs recompute: per-block latency of the KV-cache rollout against a rollout that re-runs
  the whole clean history through the block-causal forward at every denoising step (same
  outputs, checked), side by side in one run.
* long stream: per-block latency and resident memory over many blocks with a rolling window
  (``--window`` frames, ``--sink`` frames); memory must stay flat.
"""
import argparse
import resource
import time
from pathlib import Path

import torch

from selfforcing_core.config import WAN_T2V_1P3B
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import NoiseSource, StreamSettings, stream_blocks
from selfforcing_core.schedule import FlowMatchSchedule
from support.tiny import TINY

CONFIGS = {
    "tiny": TINY,
    "1.3b": WAN_T2V_1P3B,  # the released architecture, random weights
}


def rss_mb() -> float:
    """Current resident set size in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recompute_rollout(model, prompt, num_blocks, latent_shape, seed, timesteps, schedule):
    """Reference without a cache: every call re-runs [clean history, current block] block-causally.

    Draws noise in the same order as ``stream_blocks`` with a seeded generator. Yields per block.
    """
    generator = torch.Generator().manual_seed(seed)
    history = torch.zeros(1, 0, *latent_shape)
    for _ in range(num_blocks):
        shape = (1, 3, *latent_shape)
        x = torch.randn(shape, generator=generator)
        for step, t in enumerate(timesteps):
            t_block = torch.full((1, 3), float(t))
            sequence = torch.cat([history, x], dim=1)
            t_full = torch.cat([torch.zeros(1, history.shape[1]), t_block], dim=1)
            flow = model(sequence, t_full, prompt, mode="block_causal")[:, -3:]
            x0 = schedule.x0_from_flow(x, flow, t_block)
            if step + 1 < len(timesteps):
                x = schedule.add_noise(x0, torch.randn(shape, generator=generator),
                                       torch.full((1, 3), float(timesteps[step + 1])))
        history = torch.cat([history, x0], dim=1)
        yield x0


def timed_blocks(blocks):
    """(per-block seconds, outputs) of an iterator of blocks."""
    times, outputs = [], []
    start = time.perf_counter()
    for block in blocks:
        now = time.perf_counter()
        times.append(now - start)
        outputs.append(block)
        start = now
    return times, outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--latent", default="8x8", help="latent HxW (pixels / 8)")
    parser.add_argument("--blocks", type=int, default=6, help="blocks for cached vs recompute")
    parser.add_argument("--long-blocks", type=int, default=120, help="blocks of the rolling-window stream")
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--sink", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = CONFIGS[args.config]
    height, width = (int(v) for v in args.latent.split("x"))
    latent_shape = (cfg.in_dim, height, width)
    model = CausalWanModel(cfg).eval().requires_grad_(False)
    prompt = torch.randn(1, min(cfg.text_len, 64), cfg.text_dim)
    params = sum(p.numel() for p in model.parameters())
    frame_seqlen = model.frame_seqlen(height, width)
    print(f"config {args.config}: {params / 1e6:.1f} M parameters, fp32, latent {height}x{width} "
          f"({frame_seqlen} tokens/frame), {torch.get_num_threads()} CPU threads, warm (1 block discarded)")

    schedule = FlowMatchSchedule(5.0)
    timesteps = schedule.warp()
    with torch.no_grad():
        next(stream_blocks(model, prompt, 1, latent_shape, noise=NoiseSource(torch.Generator().manual_seed(9))))
        cached_times, cached = timed_blocks(stream_blocks(
            model, prompt, args.blocks, latent_shape, noise=NoiseSource(torch.Generator().manual_seed(1))))
        recompute_times, recomputed = timed_blocks(
            recompute_rollout(model, prompt, args.blocks, latent_shape, 1, timesteps, schedule))
    error = max((a - b).abs().max().item() for a, b in zip(cached, recomputed))
    print(f"\ncached vs recompute over {args.blocks} blocks (max abs diff of outputs {error:.2e}):")
    print(" block  cached_s  recompute_s  ratio")
    for block, (c, r) in enumerate(zip(cached_times, recompute_times)):
        print(f" {block:5d}  {c:8.3f}  {r:11.3f}  {r / c:5.2f}")
    print(f" total  {sum(cached_times):8.3f}  {sum(recompute_times):11.3f}  "
          f"{sum(recompute_times) / sum(cached_times):5.2f}")

    if args.long_blocks:
        print(f"\nrolling window {args.window} frames, sink {args.sink}: {args.long_blocks} blocks")
        stream = stream_blocks(model, prompt, args.long_blocks, latent_shape,
                               noise=NoiseSource(torch.Generator().manual_seed(2)),
                               settings=StreamSettings(kv_window_frames=args.window, sink_frames=args.sink))
        samples = []
        with torch.no_grad():
            start = time.perf_counter()
            for block, _ in enumerate(stream):
                now = time.perf_counter()
                samples.append((block, now - start, rss_mb()))
                start = now
        marks = sorted({min(len(samples) - 1, m) for m in (4, 9, 19, 39, 59, 79, 99, 119, len(samples) - 1)})
        print(" block  latency_s  rss_mib")
        for m in marks:
            block, latency, rss = samples[m]
            print(f" {block:5d}  {latency:9.3f}  {rss:8.1f}")
        ref = samples[min(9, len(samples) - 1)]
        last = samples[-1]
        tail = [s[1] for s in samples[len(samples) // 2:]]
        head = [s[1] for s in samples[1:len(samples) // 2]]
        print(f" RSS growth from block {ref[0]} to {last[0]}: {100 * (last[2] - ref[2]) / ref[2]:+.2f} %")
        print(f" mean latency first half {sum(head) / len(head):.3f} s, second half {sum(tail) / len(tail):.3f} s")
    print(f"\npeak RSS {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
