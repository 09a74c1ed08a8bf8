"""Precision benchmark: fp32 before the hot-path trims, fp32 now (BLAS and oneDNN linears), and bf16,
side by side in one run.

Prints figures; asserts nothing. Usage (real size: wrap in ``flock /tmp/heavy.lock``):
    python -m benchmarks.bench_precision [--quick] [--layers 30] [--latents 8x8,16x16] [--blocks 7]

* Models: the Wan2.1-T2V-1.3B architecture with random weights (``--layers`` of the real width;
  ``--quick``: 2 layers, 8x8 latents). "before" is ``model.py`` as it was before the trims
  (read from git at ``BEFORE_COMMIT``), sharing the fp32 weights of "fp32"; "bf16" holds them cast.
  "fp32 blas" is today's model with torch's BLAS linears (``linear.cpu_kernel("blas")``), as
  "before" has them; "fp32" and "bf16" use the default kernel of ``linear.py`` (oneDNN).
* Timing: the three rollouts advance block by block in turn (same seed, noise and prompt), so
  machine noise hits them alike. Per variant: the first block (text projection included) and the
  median of the later ("steady") blocks, with the process's default threads. Times are the
  process's CPU seconds divided by the thread count ("dedicated" seconds: the wall time the block
  would take on idle cores; a shared machine stretches wall time by whatever else runs, and the
  wall figures are printed beside them). Ratios use the dedicated seconds.
* GFLOP/s: FLOPs of each block counted on fake tensors, over its dedicated time, against the GEMM
  rate this machine reaches on the model's own linear weights (every linear of every layer, fp32
  and bf16 models, ``linear`` of as many rows as a call has tokens, with each variant's kernel),
  timed the same way once after every round of blocks, beside them; the median over the rounds.
* Memory, counted exactly (not sampled resident memory, which follows the allocator's caching):
  every tensor a separate, untimed rollout of ``--memory-blocks`` blocks creates is counted
  from its creation until it is freed (a dispatch mode with storage finalizers). Printed per
  variant: the weights, the peak of all tensors the rollout holds (KV cache and activations), and
  the transient peak of a steady block (its peak above what it started with).
* Error: relative L2 error of the bf16 rollout's latents (all blocks) against fp32.

Ends with one line: ``bf16 vs fp32: X.XXx faster per block, relative error Y.Ye-Z`` (largest latent size).
"""
import argparse
import statistics
import subprocess
import time
import types
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import selfforcing_core
from benchmarks import bench_flops  # noqa: F401  (registers the CPU attention FLOP formula)
from selfforcing_core.config import WAN_T2V_1P3B, WanConfig
from selfforcing_core import linear as linear_module
from selfforcing_core.linear import cpu_kernel, linear
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import NoiseSource, stream_blocks

REPO = Path(__file__).resolve().parents[1]

BEFORE_COMMIT = "5c281c84fe8f398ef06713cfee2607e0364f69b9"  # model.py with float64 RoPE per layer, 5-op RMSNorm
KERNELS = {"before": "blas", "fp32 blas": "blas", "fp32": linear_module.cpu_kernel_name,
           "bf16": linear_module.cpu_kernel_name}  # CPU linear kernel of each variant


def before_model_class():
    """``CausalWanModel`` of ``model.py`` at ``BEFORE_COMMIT``, imported inside this package."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_COMMIT}:selfforcing_core/model.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("selfforcing_core.model_before")
    module.__package__ = selfforcing_core.__name__
    exec(compile(source, f"model.py@{BEFORE_COMMIT[:7]}", "exec"), module.__dict__)
    return module.CausalWanModel


def build(model_class, state_dict, dtype) -> torch.nn.Module:
    """A model of ``model_class`` holding ``state_dict`` (shared when the dtype matches, else cast)."""
    cfg = WanConfig.from_state_dict(state_dict)
    with torch.device("meta"):
        model = model_class(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, assign=True)
    return model.eval().requires_grad_(False)


def block_flops(cfg: WanConfig, latent_hw, num_blocks: int) -> list[int]:
    """FLOPs of each block of a cached rollout (4 denoising calls + the clean pass), on fake tensors
    (without gradients, as the rollout runs: the text is projected once per clip, in block 0)."""
    counts = []
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        model = CausalWanModel(cfg).eval().requires_grad_(False)
        prompt = torch.zeros(1, cfg.text_len, cfg.text_dim)
        cache = model.new_kv_cache(*latent_hw, capacity_frames=3 * num_blocks)
        for index in range(num_blocks):
            with FlopCounterMode(display=False) as counter:
                for _ in range(5):
                    model(torch.zeros(1, 3, cfg.in_dim, *latent_hw), torch.zeros(1, 3), prompt, kv_cache=cache,
                          start_frame=3 * index)
            counts.append(counter.get_total_flops())
    return counts


def dedicated_seconds() -> float:
    """CPU seconds of this process over its thread count (see the module docstring)."""
    return time.process_time() / torch.get_num_threads()


def gemm_seconds(model: torch.nn.Module, rows: int, kernel: str) -> tuple[float, int]:
    """(dedicated seconds, FLOPs) of ``linear`` (CPU kernel ``kernel``) over every linear weight of
    ``model``'s blocks, ``rows`` input rows each, in the model's dtype, without gradients: the GEMM
    rate at the model's own shapes and memory layout."""
    linears = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=model.dtype) for m in linears}
    with cpu_kernel(kernel), torch.no_grad():
        start = dedicated_seconds()
        for layer in linears:
            linear(inputs[layer.in_features], layer.weight, layer.bias)
        elapsed = dedicated_seconds() - start
    return elapsed, sum(2 * rows * m.in_features * m.out_features for m in linears)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensors created while the mode is active and still alive; ``peak`` their maximum.

    An op's output that shares storage with one of its inputs (in-place ops, views, cache writes)
    allocates nothing; any other output's storage is counted until a finalizer sees it freed.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted: set[int] = set()

    def reset_peak(self) -> int:
        self.peak = self.live
        return self.live

    def _freed(self, pointer: int, size: int):
        self.counted.discard(pointer)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
            if size and pointer not in inputs and pointer not in self.counted:
                self.counted.add(pointer)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, pointer, size)
        return out


def memory_of_rollout(model, cfg: WanConfig, latent_hw, num_blocks: int, prompt, kernel: str) -> tuple[int, int]:
    """(peak bytes of all tensors a ``num_blocks`` rollout creates and holds, transient peak of its
    last block above the bytes held at that block's start), counted by ``LiveTensorBytes``."""
    memo = getattr(model.rope, "memo", {})  # "before" has no memo: it builds its tables in every call
    memo.clear()  # count the RoPE tables the rollout builds too
    stream = stream_blocks(model, prompt, num_blocks, (cfg.in_dim, *latent_hw),
                           noise=NoiseSource(torch.Generator().manual_seed(7)))
    with cpu_kernel(kernel), LiveTensorBytes() as counter:
        for _ in range(num_blocks - 1):
            next(stream)
        overall, held = counter.peak, counter.reset_peak()
        next(stream)
    return max(overall, counter.peak), counter.peak - held


def run_size(variants: dict, cfg: WanConfig, latent_hw, num_blocks: int, before_blocks: int, prompt) -> dict:
    """Run every variant's rollout block by block in turn, and after each round the GEMM probe of
    every variant's model and kernel; per variant: block times, wall times, latents, GEMM times."""
    streams = {name: stream_blocks(model, prompt, num_blocks if name != "before" else before_blocks,
                                   (cfg.in_dim, *latent_hw), noise=NoiseSource(torch.Generator().manual_seed(7)))
               for name, model in variants.items()}
    results = {name: {"times": [], "wall": [], "latents": [], "gemm": []} for name in variants}
    rows = 3 * (latent_hw[0] // 2) * (latent_hw[1] // 2)
    for block in range(num_blocks):
        for name, stream in streams.items():
            if name == "before" and block >= before_blocks:
                continue
            with cpu_kernel(KERNELS[name]):
                start, wall = dedicated_seconds(), time.perf_counter()
                latents = next(stream)
                elapsed, wall = dedicated_seconds() - start, time.perf_counter() - wall
            results[name]["times"].append(elapsed)
            results[name]["wall"].append(wall)
            results[name]["latents"].append(latents.float())
            print(f"  {latent_hw[0]}x{latent_hw[1]} block {block} {name:>9}: {elapsed:7.2f} s ({wall:.2f} s wall)",
                  flush=True)
        for name in ("fp32 blas", "fp32", "bf16"):
            results[name]["gemm"].append(gemm_seconds(variants[name], rows, KERNELS[name]))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, 8x8 latents (a few minutes)")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers of the real width (default 30)")
    parser.add_argument("--latents", default=None, help="latent sizes, e.g. 8x8,16x16")
    parser.add_argument("--blocks", type=int, default=7, help="blocks per fp32 / bf16 rollout (the error's clip)")
    parser.add_argument("--before-blocks", type=int, default=4, help="blocks of the 'before' rollout")
    parser.add_argument("--memory-blocks", type=int, default=3, help="blocks of the untimed memory-counting rollouts")
    args = parser.parse_args()
    layers = args.layers or (2 if args.quick else WAN_T2V_1P3B.num_layers)
    sizes = [tuple(int(n) for n in size.split("x")) for size in (args.latents or ("8x8" if args.quick else "8x8,16x16")).split(",")]
    cfg = WanConfig(dim=WAN_T2V_1P3B.dim, ffn_dim=WAN_T2V_1P3B.ffn_dim, num_layers=layers,
                    num_heads=WAN_T2V_1P3B.num_heads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {layers} layers of the 1.3B width; before = model.py at "
          f"{BEFORE_COMMIT[:7]}", flush=True)

    torch.manual_seed(0)
    state_dict = CausalWanModel(cfg).state_dict()
    fp32 = build(CausalWanModel, state_dict, torch.float32)
    variants = {"before": build(before_model_class(), state_dict, torch.float32), "fp32 blas": fp32, "fp32": fp32,
                "bf16": build(CausalWanModel, state_dict, torch.bfloat16)}
    del state_dict
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(3))
    weight_gb = {name: sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
                 for name, model in variants.items()}
    print("weights: " + ", ".join(f"{name} {gb:.2f} GB" for name, gb in weight_gb.items())
          + " (before and fp32 blas share fp32's tensors)")
    print("CPU linear kernel: " + ", ".join(f"{name} {kernel}" for name, kernel in KERNELS.items())
          + f" (oneDNN available: {linear_module.ONEDNN_AVAILABLE})")

    summary = None
    for latent_hw in sizes:
        rows = 3 * (latent_hw[0] // 2) * (latent_hw[1] // 2)
        flops = block_flops(cfg, latent_hw, args.blocks)
        print(f"\n{latent_hw[0]}x{latent_hw[1]} latents ({rows} query tokens per call)", flush=True)
        results = run_size(variants, cfg, latent_hw, args.blocks, args.before_blocks, prompt)
        rates = {name: results[name]["gemm"][0][1] / statistics.median(t for t, _ in results[name]["gemm"])
                 for name in ("fp32 blas", "fp32", "bf16")}
        rates["before"] = rates["fp32 blas"]
        print(f"GEMM rate on the models' own weights, {rows} rows, median of {len(results['fp32']['gemm'])} probes "
              f"beside the blocks: " + ", ".join(f"{name} ({KERNELS[name]}) {rates[name] / 1e9:.0f} GFLOP/s"
                                                  for name in ("fp32 blas", "fp32", "bf16")), flush=True)
        memory = {name: memory_of_rollout(model, cfg, latent_hw, args.memory_blocks, prompt, KERNELS[name])
                  for name, model in variants.items()}
        steady = {name: statistics.median(r["times"][1:]) for name, r in results.items()}
        print(f"{'variant':>9} {'first block':>12} {'steady block':>13} {'(wall)':>9} {'GFLOP/s':>8} "
              f"{'of GEMM rate':>13} {'weights MB':>11} {'rollout peak MB':>16} {'block transient MB':>19}")
        for name, r in results.items():
            achieved = statistics.median(f / t for f, t in zip(flops[1:len(r['times'])], r["times"][1:]))
            peak, transient = memory[name]
            print(f"{name:>9} {r['times'][0]:>10.2f} s {steady[name]:>11.2f} s "
                  f"{statistics.median(r['wall'][1:]):>7.2f} s {achieved / 1e9:>8.1f} "
                  f"{achieved / rates[name]:>12.0%} {weight_gb[name] * 1e3:>11.0f} {peak / 2**20:>16.1f} "
                  f"{transient / 2**20:>19.1f}")
        fp32 = torch.cat(results["fp32"]["latents"], dim=1)
        fp32_blas = torch.cat(results["fp32 blas"]["latents"], dim=1)
        bf16 = torch.cat(results["bf16"]["latents"], dim=1)
        before = torch.cat(results["before"]["latents"], dim=1)
        error = ((bf16 - fp32).norm() / fp32.norm()).item()
        speedup, trims = steady["fp32"] / steady["bf16"], steady["before"] / steady["fp32"]
        print(f"fp32 vs before the trims: {trims:.2f}x faster per steady block (the trims alone, fp32 blas vs "
              f"before: {steady['before'] / steady['fp32 blas']:.2f}x; the oneDNN linears alone, fp32 vs fp32 blas: "
              f"{steady['fp32 blas'] / steady['fp32']:.2f}x, max |difference| of the latents "
              f"{(fp32 - fp32_blas).abs().max().item():.1e}), block transient "
              f"{memory['fp32'][1] / 2**20:.1f} vs {memory['before'][1] / 2**20:.1f} MB, rollout peak "
              f"{memory['fp32'][0] / 2**20:.1f} vs {memory['before'][0] / 2**20:.1f} MB, max |difference| of the "
              f"latents {(fp32[:, :before.shape[1]] - before).abs().max().item():.1e}")
        print(f"bf16 vs fp32 ({latent_hw[0]}x{latent_hw[1]}): {speedup:.2f}x faster per steady block, block transient "
              f"{memory['bf16'][1] / 2**20:.1f} vs {memory['fp32'][1] / 2**20:.1f} MB, rollout peak "
              f"{memory['bf16'][0] / 2**20:.1f} vs {memory['fp32'][0] / 2**20:.1f} MB, relative error of the "
              f"{args.blocks}-block rollout's latents {error:.1e}; bf16 vs fp32 blas: "
              f"{steady['fp32 blas'] / steady['bf16']:.2f}x", flush=True)
        summary = (speedup, error)
    print(f"bf16 vs fp32: {summary[0]:.2f}x faster per block, relative error {summary[1]:.1e}")


if __name__ == "__main__":
    main()
