"""Decoder speed and memory: TAEHV vs Wan 2.1 VAE, streaming vs whole clip (CPU, random weights).

Both decoders at their real widths (taew2_1: 256/128/64/64; Wan2.1_VAE: base 96) with random
weights in the real key layouts, on the same generator latents. Each case runs in its own process
(for a clean peak RSS), one warm-up pass, then the median of the timed passes; times are per
output frame. RSS: after loading the weights, and the peak during warm-up + timed decodes.

    .venv/bin/python -m benchmarks.bench_decoders [--frames 6] [--size 8] [--threads 2]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "taehv whole clip": ("taehv", None),
    "taehv stream x3": ("taehv", 3),
    "wan_vae whole clip (1 chunk)": ("wan_vae", 0),
    "wan_vae decode_video (per latent)": ("wan_vae", None),
    "wan_vae stream x3": ("wan_vae", 3),
}


def run_case(name: str, frames: int, size: int, threads: int, repeats: int) -> dict:
    """Build the decoder, decode once to warm up, then time ``repeats`` decodes; report the median per frame."""
    import torch

    from support.decoder_weights import taehv_state_dict, wan_vae_state_dict
    from selfforcing_core.codec_loading import load_codec
    from selfforcing_core.latents import normalised_to_raw

    torch.set_num_threads(threads)
    kind, block = CASES[name]
    codec = load_codec(taehv_state_dict((256, 128, 64, 64), 64) if kind == "taehv" else wan_vae_state_dict(96))
    latents = torch.randn(1, frames, 16, size, size, generator=torch.Generator().manual_seed(0))

    def decode():
        with torch.no_grad():
            if block == 0:  # Wan VAE over the whole clip as one chunk (activations O(T))
                return codec.decode_raw(normalised_to_raw(latents).transpose(1, 2), {}).transpose(1, 2)
            if block is None:
                return codec.decode_video(latents)
            stream = codec.stream()
            return torch.cat([stream.decode(latents[:, i:i + block]) for i in range(0, frames, block)], 1)

    rss_weights = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    decode()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = decode()
        timings.append(time.perf_counter() - start)
    seconds = sorted(timings)[len(timings) // 2]  # median: robust to other jobs on the machine
    return {"ms_per_frame": 1000 * seconds / out.shape[1], "frames": out.shape[1],
            "rss_weights_mib": rss_weights, "peak_rss_mib": _rss_mib("VmHWM")}


def _rss_mib(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6, help="latent frames (6 = two 3-frame blocks)")
    parser.add_argument("--size", type=int, default=8, help="latent height = width (x8 pixels)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed decodes per case (median reported)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.frames, args.size, args.threads, args.repeats)))
        return
    print(f"latents [1, {args.frames}, 16, {args.size}, {args.size}] -> {args.size * 8}x{args.size * 8} px, "
          f"CPU float32, {args.threads} threads, warm, real widths, random weights")
    results = {}
    for name in CASES:
        command = [sys.executable, "-m", "benchmarks.bench_decoders", "--case", name, "--frames", str(args.frames),
                   "--size", str(args.size), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        results[name] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout)
        r = results[name]
        print(f"{name:<36} {r['ms_per_frame']:9.2f} ms/frame  ({r['frames']} frames)  RSS weights {r['rss_weights_mib']:6.0f} MiB, peak decoding {r['peak_rss_mib']:6.0f} MiB")
    taehv, wan = results["taehv stream x3"]["ms_per_frame"], results["wan_vae stream x3"]["ms_per_frame"]
    print(f"Wan VAE / TAEHV time per frame (streamed x3): {wan / taehv:.1f}x")
    for kind, whole in (("taehv", "taehv whole clip"), ("wan_vae", "wan_vae whole clip (1 chunk)")):
        print(f"{kind}: streamed x3 / whole clip time per frame: "
              f"{results[f'{kind} stream x3']['ms_per_frame'] / results[whole]['ms_per_frame']:.2f}")


if __name__ == "__main__":
    main()
