"""Per-step time of the trainer's generator, critic and clip-adapter updates on the CPU, and peak RSS.

Method: random-weight models, float32, warm (one untimed step of each kind first), median of
``--repeats`` timed steps, batch 1, LoRA rank 16 on the default targets, gradient checkpointing on.
    .venv/bin/python benchmarks/bench_train.py [--repeats 5] [--threads 2]
"""
import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfforcing_core.model import CausalWanModel, WanConfig  # noqa: E402
from selfforcing_core.trainer import ClipBatchSource, Trainer, TrainConfig  # noqa: E402

CONFIGS = {  # name: (model config, latent frames, latent height, latent width)
    "tiny": (WanConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, text_dim=32, text_len=16), 6, 4, 4),
    "mid": (WanConfig(dim=512, ffn_dim=1024, num_layers=6, num_heads=4, text_dim=128, text_len=64), 6, 16, 16),
}


def time_step(fn, repeats):
    fn(torch.Generator().manual_seed(0))
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(torch.Generator().manual_seed(r + 1))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, float32, batch 1, LoRA rank 16, median of {args.repeats} warm steps")
    for name, (cfg, frames, h, w) in CONFIGS.items():
        torch.manual_seed(0)
        model = CausalWanModel(cfg)
        data = ClipBatchSource(latents=torch.randn(2, frames, 16, h, w), prompts=[torch.randn(cfg.text_len, cfg.text_dim)] * 2,
                               negative=torch.randn(cfg.text_len, cfg.text_dim))
        trainer = Trainer(model, data, TrainConfig(lora_rank=16, ema_start_step=0))
        tokens = frames * (h // 2) * (w // 2)
        figures = {kind: time_step(getattr(trainer, f"{kind}_step"), args.repeats) for kind in ("generator", "critic", "real")}
        print(f"{name:5s} dim {cfg.dim} x {cfg.num_layers} layers, {frames} latent frames of {h}x{w} ({tokens} tokens): "
              + ", ".join(f"{kind} step {seconds * 1000:.0f} ms" for kind, seconds in figures.items())
              + f"; iteration at ratio 5: {(figures['generator'] / 5 + figures['critic'] + figures['real']) * 1000:.0f} ms")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
