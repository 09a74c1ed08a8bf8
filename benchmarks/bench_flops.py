"""FLOPs per video frame of the real architectures at 480x832, counted, and GPU projections from them.

Prints figures; asserts nothing. Usage: python -m benchmarks.bench_flops [--cpu-check]

* Counting: the real Wan2.1-T2V-1.3B generator (and the real-width TAEHV and Wan VAE decoders)
  run on fake tensors (no memory, no arithmetic) under torch's FlopCounterMode, through the same
  code as generation: an 81-frame clip = 7 blocks x (4 denoising calls + 1 clean-context pass),
  global KV cache, and the same with a rolling 21-frame window for a long stream.
* Projection: frames/s = peak x utilisation / FLOPs per frame, for an H100 SXM (989 TFLOP/s dense
  bf16) and an RTX 4090 (165 TFLOP/s dense bf16, fp32 accumulate), at stated utilisations. These
  are projections, not measurements.
* ``--cpu-check``: the counted FLOPs of a small CPU run divided by its measured time, to show the
  counter and the timing agree on this machine.
"""
import argparse
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from support.decoder_weights import taehv_shapes, wan_vae_shapes
from selfforcing_core.codec_loading import load_codec
from selfforcing_core.config import WAN_T2V_1P3B
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.rollout import NoiseSource, sample_video
from selfforcing_core.units import video_frames_for


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch counts the CUDA attention kernels but not the CPU one; same formula (QK^T and AV)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


DEVICES = {"H100 SXM (989 TFLOP/s bf16 dense)": 989e12, "RTX 4090 (165 TFLOP/s bf16 dense)": 165e12}
UTILISATIONS = (0.3, 0.5)


def rollout_flops(cfg: WanConfig, latent_hw, num_blocks: int, window: int | None) -> int:
    """FLOPs of generating ``num_blocks`` blocks on fake tensors: per block the model calls of the
    rollout (4 denoising steps + 1 clean-context pass) against the KV cache, text embedding included.
    The elementwise x0 / re-noise arithmetic between calls is left out (negligible)."""
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():  # as generation runs (text projected once)
        model = CausalWanModel(cfg).eval().requires_grad_(False)
        prompt = torch.zeros(1, cfg.text_len, cfg.text_dim)
        cache = model.new_kv_cache(*latent_hw, capacity_frames=window or 3 * num_blocks, rolling=window is not None)
        block = torch.zeros(1, 3, cfg.in_dim, *latent_hw)
        with FlopCounterMode(display=False) as counter:
            for index in range(num_blocks):
                for _ in range(5):
                    model(block, torch.zeros(1, 3), prompt, kv_cache=cache, start_frame=3 * index)
    return counter.get_total_flops()


def per_block_flops(cfg: WanConfig, latent_hw, num_blocks: int) -> list[tuple[int, int]]:
    """(cached, recompute) FLOPs of each block: the KV-cache rollout (4 steps + clean pass) against
    re-running [clean history, current block] block-causally at each of the 4 steps (text
    projections included: once per clip with the cache, every call without)."""
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():  # as generation runs (text projected once)
        model = CausalWanModel(cfg).eval().requires_grad_(False)
        prompt = torch.zeros(1, cfg.text_len, cfg.text_dim)
        cache = model.new_kv_cache(*latent_hw, capacity_frames=3 * num_blocks)
        rows = []
        for index in range(num_blocks):
            with FlopCounterMode(display=False) as cached:
                for _ in range(5):
                    model(torch.zeros(1, 3, cfg.in_dim, *latent_hw), torch.zeros(1, 3), prompt, kv_cache=cache,
                          start_frame=3 * index)
            frames = 3 * (index + 1)
            with FlopCounterMode(display=False) as recompute:
                for _ in range(4):
                    model(torch.zeros(1, frames, cfg.in_dim, *latent_hw), torch.zeros(1, frames), prompt,
                          mode="block_causal")
            rows.append((cached.get_total_flops(), recompute.get_total_flops()))
    return rows


def decoder_flops(state_dict_shapes, latent_hw, latent_frames: int) -> int:
    """FLOPs of decoding ``latent_frames`` latents with a codec of the given parameter shapes."""
    codec = load_codec({name: torch.zeros(shape) for name, shape in state_dict_shapes.items()})
    with FakeTensorMode(allow_non_fake_inputs=True):
        with FlopCounterMode(display=False) as counter:
            codec.decode_video(torch.zeros(1, latent_frames, 16, *latent_hw))
    return counter.get_total_flops()


def cpu_check():
    """Counted FLOPs / measured seconds of a small real run on this CPU."""
    cfg = WanConfig(dim=512, ffn_dim=2048, num_layers=4, num_heads=4, text_dim=256, text_len=64)
    latent_hw, blocks = (16, 16), 3
    counted = rollout_flops(cfg, latent_hw, blocks, None)
    torch.manual_seed(0)
    model = CausalWanModel(cfg).eval().requires_grad_(False)
    prompt = torch.randn(1, 64, 256)
    sample_video(model, prompt, 1, (16, *latent_hw), noise=NoiseSource(torch.Generator().manual_seed(0)))  # warm
    start = time.perf_counter()
    sample_video(model, prompt, blocks, (16, *latent_hw), noise=NoiseSource(torch.Generator().manual_seed(1)))
    seconds = time.perf_counter() - start
    print(f"\nCPU check (dim 512, 4 layers, latent 16x16, {blocks} blocks, {torch.get_num_threads()} threads): "
          f"{counted / 1e9:.1f} GFLOP counted in {seconds:.2f} s = {counted / seconds / 1e9:.1f} GFLOP/s achieved")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-check", action="store_true")
    args = parser.parse_args()
    latent_hw, blocks = (60, 104), 7  # 480x832, 81 frames
    frames = video_frames_for(3 * blocks)
    rows = [("generator, 81 frames, global cache", rollout_flops(WAN_T2V_1P3B, latent_hw, blocks, None)),
            ("generator, 81 frames, rolling window 21", rollout_flops(WAN_T2V_1P3B, latent_hw, blocks, 21))]
    # Long-stream steady state: blocks 8..14 of a stream with a full 21-frame window.
    long_stream = rollout_flops(WAN_T2V_1P3B, latent_hw, 2 * blocks, 21) - rows[1][1]
    rows.append(("generator, steady long stream, window 21", long_stream))
    rows.append(("TAEHV decode", decoder_flops(taehv_shapes(), latent_hw, 3 * blocks)))
    rows.append(("Wan 2.1 VAE decode", decoder_flops(wan_vae_shapes(), latent_hw, 3 * blocks)))
    print(f"FLOPs per video frame at 480x832 ({frames} frames = {blocks} blocks of 3 latent frames, "
          "4 steps + 1 clean-context pass per block), counted on fake tensors:")
    for label, flops in rows:
        print(f"  {label:<44} {flops / frames / 1e12:7.2f} TFLOP/frame")
    generator = rows[0][1] / frames
    print("\nprojected frames/s (generator, global cache, + TAEHV decode) = peak x utilisation / FLOPs per frame:")
    for device, peak in DEVICES.items():
        for utilisation in UTILISATIONS:
            fps = peak * utilisation / (generator + rows[3][1] / frames)
            print(f"  {device:<36} at {utilisation:.0%} utilisation: {fps:5.1f} frames/s")
    print("\nper block at 480x832, cached rollout vs recomputing the history (counted):")
    print(" block  cached_TFLOP  recompute_TFLOP  ratio")
    for index, (cached, recompute) in enumerate(per_block_flops(WAN_T2V_1P3B, latent_hw, blocks)):
        print(f" {index:5d}  {cached / 1e12:12.1f}  {recompute / 1e12:15.1f}  {recompute / cached:5.2f}")
    if args.cpu_check:
        cpu_check()


if __name__ == "__main__":
    main()
