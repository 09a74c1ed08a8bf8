"""FP8 weight bytes of the real 1.3B transformer, the 480x832 memory table, compile vs eager.

    .venv/bin/python -m benchmarks.bench_fp8_memory [--skip-weights] [--skip-compile]

1. Builds the real Wan2.1-T2V-1.3B architecture with random bf16 weights, loads it as bf16 and as
   FP8 (e4m3fn, per-tensor and per-channel) through ``load_generator`` and counts the bytes of
   every tensor the model holds (needs ~6 GB of RAM).
2. Prints ``estimate_memory`` for 480x832 (bf16 compute) at several KV windows.
3. Per-block latency of a warm rolling stream, eager vs ``compile_blocks`` (CPU, a dim-512
   model), and dynamo's graph count after every block.
"""
import argparse
import gc
import time

import torch


from selfforcing_core.checkpoint import load_generator
from selfforcing_core.compile import compile_blocks, compile_failed, compiled_graph_count
from selfforcing_core.memory import estimate_memory
from selfforcing_core.config import WAN_T2V_1P3B as REAL_1P3B
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.rollout import NoiseSource, StreamSettings, stream_blocks


GIB = 2 ** 30


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def random_bf16_state_dict(cfg: WanConfig) -> dict:
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in CausalWanModel(cfg).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    return {name: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
            for name, shape in shapes.items()}


def weight_bytes_table():
    print("== Transformer weight bytes, real 1.3B architecture (random weights) ==")
    state_dict = random_bf16_state_dict(REAL_1P3B)
    rows = []
    for fp8, granularity in (("off", "tensor"), ("e4m3fn", "tensor"), ("e4m3fn", "channel")):
        start = time.perf_counter()
        model = load_generator(state_dict, dtype="bf16", fp8=fp8, fp8_granularity=granularity)
        seconds = time.perf_counter() - start
        measured = model_bytes(model)
        estimated = estimate_memory(REAL_1P3B, dtype=torch.bfloat16, fp8=fp8, fp8_granularity=granularity).weights
        rows.append((f"{'bf16' if fp8 == 'off' else fp8 + ' per-' + granularity}", measured, estimated, seconds))
        del model
        gc.collect()
    bf16 = rows[0][1]
    print(f"{'weights':<24}{'bytes':>16}{'GiB':>8}{'x bf16':>8}{'estimate':>16}{'load s':>8}")
    for name, measured, estimated, seconds in rows:
        print(f"{name:<24}{measured:>16,}{measured / GIB:>8.3f}{measured / bf16:>8.3f}{estimated:>16,}{seconds:>8.1f}")
    del state_dict
    gc.collect()


def memory_table():
    print("\n== Estimated device memory, 480x832, batch 1, blocks of 3 latent frames, text encoder and "
          "decoder not included ==")
    print(f"{'KV window (latent frames)':<30}{'KV cache':>10}{'bf16 total':>12}{'FP8 total':>11}"
          f"{'FP8 + 15 blocks offloaded':>27}")
    for window in (6, 9, 12, 15, None):
        name = f"{window} ({4 * window} video frames)" if window else "global, 21 (81 video frames)"
        bf16 = estimate_memory(REAL_1P3B, 480, 832, kv_window_frames=window)
        fp8 = estimate_memory(REAL_1P3B, 480, 832, kv_window_frames=window, fp8="e4m3fn")
        offload = estimate_memory(REAL_1P3B, 480, 832, kv_window_frames=window, fp8="e4m3fn", offload_blocks=15)
        print(f"{name:<30}{bf16.kv_cache / GIB:>9.2f}G{bf16.total / GIB:>11.2f}G{fp8.total / GIB:>10.2f}G"
              f"{offload.total / GIB:>26.2f}G")
    example = estimate_memory(REAL_1P3B, 480, 832, kv_window_frames=12)
    print(f"parts at window 12, bf16: {example}")


def compile_latency(num_blocks: int):
    print("\n== Compile vs eager on this CPU (dim 512, 4 layers, 16x16 latent, window 6 frames; a block = "
          "4 denoising calls + 1 cache pass; the two streams run interleaved, block by block) ==")
    cfg = WanConfig(dim=512, ffn_dim=2048, num_layers=4, num_heads=4, text_dim=256, text_len=64)
    prompt = torch.randn(1, 20, 256)
    models = {}
    for label in ("eager", "compiled"):
        torch.manual_seed(0)
        models[label] = CausalWanModel(cfg).eval().requires_grad_(False)
    print(compile_blocks(models["compiled"], "cpu"))
    streams = {label: stream_blocks(model, prompt, num_blocks, (16, 16, 16),
                                    noise=NoiseSource(torch.Generator().manual_seed(1)),
                                    settings=StreamSettings(kv_window_frames=6))
               for label, model in models.items()}
    times = {label: [] for label in streams}
    graphs, largest_difference = [], 0.0
    for _ in range(num_blocks):
        outputs = {}
        for label, blocks in streams.items():
            start = time.perf_counter()
            outputs[label] = next(blocks)
            times[label].append(time.perf_counter() - start)
        graphs.append(compiled_graph_count())
        largest_difference = max(largest_difference, (outputs["eager"] - outputs["compiled"]).abs().max().item())
    for label, seconds in times.items():
        warm = sorted(seconds[3:])[len(seconds[3:]) // 2]
        print(f"{label:<9} first block {seconds[0]:6.2f} s, warm median {warm * 1000:7.1f} ms/block")
    print(f"dynamo graphs after each block: {graphs}")
    print(f"largest |eager - compiled| over all latents: {largest_difference:.2e}")
    if compile_failed(models["compiled"]):
        print(f"compile fell back to eager: {compile_failed(models['compiled'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-weights", action="store_true", help="skip the 1.3B weight-bytes part (needs ~6 GB)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--blocks", type=int, default=10, help="blocks streamed for the compile comparison")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not args.skip_weights:
        weight_bytes_table()
    memory_table()
    if not args.skip_compile:
        compile_latency(args.blocks)


if __name__ == "__main__":
    main()
