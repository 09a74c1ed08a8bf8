"""LongLive benchmark: block-relativistic against absolute RoPE over a long stream, one switch
re-cache against one block, and a LoRA merged against unmerged (CPU, random weights).

Prints figures; asserts nothing. Usage (real width: wrap in ``flock /tmp/heavy.lock``), from the
repository root:
    python -m benchmarks.bench_longlive [--layers 30] [--latent 4x4] [--blocks 300] [--dtype bf16]

* Model: the Wan2.1-T2V-1.3B architecture (dim 1536, 12 heads, FFN 8960) with random weights,
  ``--layers`` of its 30 layers (every figure here is per layer alike, so the ratios hold for
  30), at a small latent.
* RoPE: two streams of the LongLive family (window 12, sink 3, sink protection), one with
  block-relativistic RoPE (its own), one overridden to absolute, advance block by block in turn
  (same seed and prompt), so machine noise hits both alike. Per block: "dedicated" seconds (the
  process's CPU seconds over its thread count: the wall time on idle cores; wall seconds are
  printed beside them) and resident memory after the block. Flatness: the median of the first
  and of the last ``--window`` blocks (the first block, with the text projection, left out);
  and, since the machine's speed drifts over minutes, the same in one stretch of time: each long
  stream's next ``--window`` blocks in turn with a fresh stream of its rules (its blocks 2 on).
  An absolute stream ends at 1023 latent frames (341 blocks), so ``--blocks`` + ``--window``
  stays below that.
* Switch re-cache: LongLive's one call over the window under a new prompt, timed on the relative
  stream's state after the run (median of 5), against that stream's median block.
* LoRA: a random rank-``--rank`` LoRA on every linear of the blocks (LongLive's is rank 256),
  merged into a copy of the weights against attached unmerged (``lora.attach_lora``: a strength
  change needs no re-load), ``--lora-blocks`` blocks each, in turn.
"""
import argparse
import copy
import resource
import statistics
import time
from itertools import islice

import torch

from selfforcing_core.config import WAN_T2V_1P3B
from selfforcing_core.families import FAMILIES
from selfforcing_core.lora import DEFAULT_TARGETS, attach_lora, merge_lora
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import NoiseSource, recache_prompt, stream_blocks

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def dedicated_seconds() -> float:
    """CPU seconds of this process over its thread count."""
    return time.process_time() / torch.get_num_threads()


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def stream(model, family, prompt, num_blocks, latent_hw, states=None):
    """The family's block stream (seed 0); the rollout state is appended to ``states`` after each block."""
    return stream_blocks(model, prompt, num_blocks, (model.cfg.in_dim, *latent_hw),
                         noise=NoiseSource(torch.Generator().manual_seed(0)), settings=family.settings(),
                         callback=None if states is None else lambda info: states.append(info["state"]))


def in_turn(streams: dict) -> dict:
    """Advance the named block iterators one block each in turn until all end; per name a list of
    (dedicated seconds, wall seconds, resident MiB) per block."""
    times = {name: [] for name in streams}
    active = dict(streams)
    while active:
        for name, blocks in list(active.items()):
            cpu, wall = dedicated_seconds(), time.perf_counter()
            if next(blocks, None) is None:
                del active[name]
                continue
            times[name].append((dedicated_seconds() - cpu, time.perf_counter() - wall, rss_mib()))
    return times


def median(rows, column=0):
    return statistics.median(row[column] for row in rows)


def random_lora(model, rank: int, seed: int = 0) -> dict:
    """A LoRA in ComfyUI's layout on every ``DEFAULT_TARGETS`` linear of every block (alpha = rank)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, block in enumerate(model.blocks):
        for target in DEFAULT_TARGETS:
            out_features, in_features = block.get_submodule(target).weight.shape
            stem = f"diffusion_model.blocks.{index}.{target}"
            tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
            tensors[f"{stem}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 1e-3
    return tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--latent", default="4x4", help="latent HxW (pixels / 8)")
    parser.add_argument("--blocks", type=int, default=300)
    parser.add_argument("--window", type=int, default=20, help="blocks in each flatness median")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--lora-blocks", type=int, default=12)
    args = parser.parse_args()
    latent_hw = tuple(int(side) for side in args.latent.split("x"))
    torch.manual_seed(0)
    cfg = WAN_T2V_1P3B.__class__(**{**WAN_T2V_1P3B.__dict__, "num_layers": args.layers})
    model = CausalWanModel(cfg).to(DTYPES[args.dtype]).eval().requires_grad_(False)
    prompt = torch.randn(1, 64, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    relative = FAMILIES["longlive"]
    absolute = relative.overridden(rope="absolute")
    print(f"Wan2.1-1.3B width, {args.layers} layers, {args.dtype}, latent {args.latent}, "
          f"{torch.get_num_threads()} threads; weights {rss_mib():.0f} MiB resident")
    print(f"relative: {relative.describe_cache()}\nabsolute: {absolute.describe_cache()}")

    states, w = [], args.window
    families = {"relative": relative, "absolute": absolute}
    long_streams = {"relative": stream(model, relative, prompt, args.blocks + w, latent_hw, states),
                    "absolute": stream(model, absolute, prompt, args.blocks + w, latent_hw)}
    times = in_turn({name: islice(blocks, args.blocks) for name, blocks in long_streams.items()})
    print(f"\nper block over {args.blocks} blocks (dedicated s; wall s; resident MiB after the block):")
    print(f"{'RoPE':10}{'first ' + str(w):>14}{'last ' + str(w):>14}{'last/first':>12}{'median wall':>13}"
          f"{'MiB @' + str(w):>10}{'MiB end':>10}")
    for name, rows in times.items():
        first, last = median(rows[1:1 + w]), median(rows[-w:])
        print(f"{name:10}{first:14.4f}{last:14.4f}{last / first:12.3f}{median(rows[1:], 1):13.4f}"
              f"{rows[w][2]:10.0f}{rows[-1][2]:10.0f}")
    ratio = median(times["relative"][1:]) / median(times["absolute"][1:])
    print(f"relative / absolute per block (median of blocks 2..{args.blocks}): {ratio:.3f}x")
    same_time = in_turn({**long_streams, **{f"{name} fresh": stream(model, family, prompt, w + 1, latent_hw)
                                           for name, family in families.items()}})
    for name in families:
        late, fresh = median(same_time[name]), median(same_time[f"{name} fresh"][1:])
        print(f"{name}: blocks {args.blocks + 1}..{args.blocks + w} against a fresh stream's blocks 2..{w + 1}, "
              f"in turn: {late:.4f} s vs {fresh:.4f} s, {late / fresh:.3f}x")

    state, block = states[-1], median(times["relative"][1:])
    recache = []
    for _ in range(5):
        state.prompt = prompt.flip(1)  # another prompt
        cpu = dedicated_seconds()
        with torch.no_grad():
            recache_prompt(model, state)
        recache.append(dedicated_seconds() - cpu)
    print(f"\nswitch re-cache (one call over the {state.kv_cache.capacity_frames}-frame window): "
          f"{statistics.median(recache):.4f} s = {statistics.median(recache) / block:.2f}x one block "
          f"({block:.4f} s)")

    lora = random_lora(model, args.rank)
    merged = copy.deepcopy(model)
    merge_lora(merged, lora)
    attached = attach_lora(model, lora)
    del lora
    times = in_turn({"merged": stream(merged, relative, prompt, args.lora_blocks, latent_hw),
                     "unmerged": stream(model, relative, prompt, args.lora_blocks, latent_hw)})
    print(f"\nLoRA rank {args.rank} on every block linear, per block (median of blocks 2..{args.lora_blocks}):")
    for name, rows in times.items():
        print(f"{name:10}{median(rows[1:]):10.4f} s dedicated, {median(rows[1:], 1):.4f} s wall")
    print(f"unmerged / merged per block: {median(times['unmerged'][1:]) / median(times['merged'][1:]):.3f}x; "
          f"{attached.describe()}")
    cpu = dedicated_seconds()
    attached.set_strength(0.5)
    print(f"strength change (unmerged): {dedicated_seconds() - cpu:.4f} s")


if __name__ == "__main__":
    main()
