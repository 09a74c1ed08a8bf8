"""Per-step time of the trainer's updates on the CPU, activation memory of the generator step, peak RSS.

Method: random-weight models, float32, warm (one untimed step of each kind first), median of
``--repeats`` timed steps, batch 1, LoRA rank 16 on the default targets, gradient checkpointing on;
the same for ``finetune="full"``. Activation memory = bytes of the distinct non-parameter tensors
autograd keeps for the backward pass of one generator step (exit step at the last denoising step),
plus the cached-context copies of checkpointed exit steps, with and without gradient checkpointing.
    .venv/bin/python -m benchmarks.bench_train [--repeats 5] [--threads 2] [--memory-only]
"""
import argparse
import resource
import statistics
import time

import torch

from selfforcing_core import dmd
from selfforcing_core.clips import ClipBatchSource
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.trainer import Trainer, TrainConfig
from support.tiny import TINY

CONFIGS = {  # name: (model config, latent frames, latent height, latent width)
    "tiny": (TINY, 6, 4, 4),
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


def saved_activation_bytes(trainer: Trainer) -> int:
    """Bytes kept for backward by one generator step: distinct storages saved by autograd (parameters
    excluded) plus the cached-context copies of checkpointed exit steps."""
    params = {p.untyped_storage().data_ptr() for network in trainer.networks for p in network.parameters()}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor
    plain_store = dmd.CachedContextSnapshot.store

    def store(snapshot, layer, k, v):
        out = plain_store(snapshot, layer, k, v)
        for pair in snapshot.context:
            for tensor in pair:
                keep(tensor)
        return out
    trainer.timesteps = trainer.timesteps[-1:]  # one denoising step: the exit step is always taken with grad
    dmd.CachedContextSnapshot.store = store
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            trainer.generator_step(torch.Generator().manual_seed(0))
    finally:
        dmd.CachedContextSnapshot.store = plain_store
    return sum(storages.values())


def make_trainer(cfg, frames, h, w, **options):
    torch.manual_seed(0)
    data = ClipBatchSource(latents=torch.randn(2, frames, 16, h, w), prompts=[torch.randn(cfg.text_len, cfg.text_dim)] * 2,
                           negative=torch.randn(cfg.text_len, cfg.text_dim))
    return Trainer(CausalWanModel(cfg), data, TrainConfig(lora_rank=16, ema_start_step=0, **options))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-only", action="store_true", help="skip the step timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, float32, batch 1, LoRA rank 16, median of {args.repeats} warm steps")
    for name, (cfg, frames, h, w) in CONFIGS.items():
        tokens = frames * (h // 2) * (w // 2)
        print(f"{name:5s} dim {cfg.dim} x {cfg.num_layers} layers, {frames} latent frames of {h}x{w} ({tokens} tokens)")
        for finetune in () if args.memory_only else ("lora", "full"):
            trainer = make_trainer(cfg, frames, h, w, finetune=finetune)
            figures = {kind: time_step(getattr(trainer, f"{kind}_step"), args.repeats)
                       for kind in ("generator", "critic", "real")}
            print(f"  {finetune:4s}: " + ", ".join(f"{kind} step {seconds * 1000:.0f} ms" for kind, seconds in figures.items())
                  + f"; iteration at ratio 5: {(figures['generator'] / 5 + figures['critic'] + figures['real']) * 1000:.0f} ms")
        saved = {on: saved_activation_bytes(make_trainer(cfg, frames, h, w, gradient_checkpointing=on)) / 2 ** 20
                 for on in (False, True)}
        print(f"  generator-step activations kept for backward (LoRA): {saved[False]:.2f} MiB without, "
              f"{saved[True]:.2f} MiB with gradient checkpointing ({saved[False] / saved[True]:.1f}x less)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
