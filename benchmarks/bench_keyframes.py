"""Keyframe benchmark: how smoothly each method arrives at its keyframes, on a synthetic clip.

Prints figures; asserts nothing. Usage:
    python -m benchmarks.bench_keyframes [--blocks 7] [--latent 8x8] [--strength 1.0]

Setup: the parity fixture's tiny generator (random weights written by the official code; a random
tiny model when the fixtures are absent), latent space throughout (no decoder). A random model has
no notion of motion, so the synthetic clip gets its smoothness from its noise: every noise tensor
(initial and re-noise) drifts slowly from frame to frame (``drifting_noise``), which makes the plain
clip change gradually. The keyframes are frames of a *second* such clip (other seed, other
prompt): latents the model can produce but that the first clip does not pass through. The start "image" is a still block of the target clip's first
frame (what ``start_block`` builds from an image).

Per run and keyframe: RMS distance to the keyframe latent of the frames k-3 .. k+2, and the step
change RMS(x[j+1] - x[j]) around k. "arrival cut ratio" = largest step change among the steps
entering frames k-8 .. k, "exit cut ratio" = largest of the two steps leaving k, each divided by
the median step change of the whole clip; no hard cut means <= 2.
Also the step from the start block into the first generated frame, and wall time per run.
"""
import argparse
import time
from pathlib import Path

import torch

from selfforcing_core.checkpoint import load_generator
from selfforcing_core.keyframes import Keyframe, KeyframeGuide
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import NoiseSource, StreamSettings, sample_video
from support.tiny import TINY

FIXTURE_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "selfforcing" / "weights.safetensors"


def tiny_generator() -> tuple[CausalWanModel, str]:
    if FIXTURE_WEIGHTS.is_file():
        return load_generator(str(FIXTURE_WEIGHTS), dtype="fp32", num_heads=2, text_len=16), "fixture weights"
    torch.manual_seed(0)
    return CausalWanModel(TINY).eval(), "random tiny model"


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def drifting_noise(seed: int, num_blocks: int, latent_shape, steps: int = 4, radians_per_frame: float = 0.1):
    """Unit-variance Gaussian noise that rotates slowly between two draws from frame to frame."""
    generator = torch.Generator().manual_seed(seed)
    angle = radians_per_frame * torch.arange(3 * num_blocks).view(-1, 1, 1, 1)

    def sequence():  # [3 * num_blocks, C, H, W]
        a, b = torch.randn(2, *latent_shape, generator=generator)
        return angle.cos() * a + angle.sin() * b

    initial = sequence()[None]
    renoise = torch.stack([sequence().view(num_blocks, 1, 3, *latent_shape) for _ in range(steps - 1)], dim=1)
    return NoiseSource(initial=initial, renoise=renoise)


def run(model, prompt, num_blocks, latent_shape, seed, start=None, keyframes=(), **guide_kwargs):
    """(clip [F, C, H, W] with the start block first, seconds) of a keyframe-guided stream."""
    began = time.perf_counter()
    with torch.no_grad():
        video = sample_video(model, prompt, num_blocks, latent_shape,
                             noise=drifting_noise(seed, num_blocks, latent_shape),
                             settings=StreamSettings(prefill=start), guide=KeyframeGuide(keyframes, **guide_kwargs))
    return video[0], time.perf_counter() - began


def report(name: str, video: torch.Tensor, plain: torch.Tensor, keyframes: list[Keyframe], seconds: float,
           start_frames: int):
    steps = torch.tensor([rms(video[j + 1] - video[j]) for j in range(video.shape[0] - 1)])
    median = steps.median().item()
    first_block = keyframes[0].latent_frame // 3 * 3
    head = (f"{name:<18} {seconds:6.2f}s  median step {median:.3f}  change vs plain before the first "
            f"keyframe's block {rms(video[:first_block] - plain[:first_block]):.4f}")
    if start_frames:
        head += f"  start->generated step {steps[start_frames - 1].item() / median:.2f}x median"
    parts = [head]
    for keyframe in keyframes:
        k, last = keyframe.latent_frame, video.shape[0] - 1
        around = range(max(0, k - 3), min(last, k + 2) + 1)
        distance = " ".join(f"{rms(video[j] - keyframe.latent[0]):.2f}" for j in around)
        arrival = max(steps[j - 1].item() for j in range(max(1, k - 8), k + 1)) / median
        line = f"k={k}: dist[{around.start}..{around.stop - 1}] {distance} | arrival cut ratio {arrival:.2f}"
        if k < last:
            exit_ratio = max(steps[j].item() for j in range(k, min(last, k + 2))) / median
            line += f", exit cut ratio {exit_ratio:.2f}"
        parts.append(line)
    print("\n    ".join(parts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--latent", default="8x8", help="latent height x width")
    parser.add_argument("--strength", type=float, default=1.0)
    args = parser.parse_args()
    height, width = map(int, args.latent.split("x"))
    latent_shape = (16, height, width)
    model, source = tiny_generator()
    torch.set_num_threads(2)
    prompt = torch.randn(1, 11, model.cfg.text_dim, generator=torch.Generator().manual_seed(1))
    target_prompt = torch.randn(1, 11, model.cfg.text_dim, generator=torch.Generator().manual_seed(2))
    target, _ = run(model, target_prompt, args.blocks, latent_shape, seed=99)
    frames = 3 * args.blocks
    print(f"{source}, latent {latent_shape}, {args.blocks} blocks, strength {args.strength}, CPU fp32")

    for with_start in (False, True):
        start = target[0:1].expand(3, -1, -1, -1)[None] if with_start else None
        total = frames + (3 if with_start else 0)
        keyframes = [Keyframe(total // 2, target[total // 2 - 1][None], args.strength),
                     Keyframe(total - 1, target[frames - 1][None], args.strength)]
        print(f"\n== {'start image + ' if with_start else ''}keyframes at latent frames "
              f"{[kf.latent_frame for kf in keyframes]} of {total}")
        plain, seconds = run(model, prompt, args.blocks, latent_shape, seed=0, start=start)
        report("plain", plain, plain, keyframes, seconds, 3 if with_start else 0)
        runs = [(f"guidance ramp {ramp}", dict(method="guidance", ramp_frames=ramp)) for ramp in (0, 2, 5, 8)]
        runs += [("anchor", dict(method="anchor"))]
        for name, kwargs in runs:
            video, seconds = run(model, prompt, args.blocks, latent_shape, seed=0, start=start, keyframes=keyframes,
                                 **kwargs)
            report(name, video, plain, keyframes, seconds, 3 if with_start else 0)


if __name__ == "__main__":
    main()
