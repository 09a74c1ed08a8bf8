"""Command line trainer: ``python -m selfforcing_core.train CONFIG.json`` (one process or torchrun).

CONFIG is a JSON object::

    {"model": "self_forcing_dmd.safetensors",   # generator checkpoint (any layout load_generator reads)
     "dataset": "clips_cache/",                  # folder prepared by clips.prepare_clips (index.json)
     "output": "runs/my_lora/",                  # checkpoint.pt and the LoRA file go here
     "num_heads": null, "text_len": 512, "dtype": "auto",   # optional model-loading options
     "lora_name": "my_lora.safetensors",         # optional, default <output>/lora.safetensors
     "training": {"steps": 600, "batch_size": 8, ...}}      # TrainConfig fields

Scaling out: ``torchrun --nproc_per_node N -m selfforcing_core.train CONFIG.json``; each process
takes ``batch_size / N`` samples of every global batch and adapter gradients are averaged
(NCCL on GPUs, gloo on CPUs). A run resumes from ``<output>/checkpoint.pt`` when it exists.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from .checkpoint import load_generator
from .clips import load_clips
from .trainer import Trainer, TrainConfig

KNOWN_KEYS = {"model", "dataset", "output", "num_heads", "head_dim", "text_len", "dtype", "lora_name", "training"}


def read_config(path) -> dict:
    """Parse and check the JSON config; errors name the missing or unknown keys."""
    with open(path) as file:
        config = json.load(file)
    missing = [key for key in ("model", "dataset", "output") if key not in config]
    unknown = sorted(set(config) - KNOWN_KEYS)
    if missing or unknown:
        raise SystemExit(f"{path}: missing keys {missing}, unknown keys {unknown}; known: {sorted(KNOWN_KEYS)}")
    return config


def init_distributed() -> torch.device:
    """Join the torchrun group when launched by torchrun; returns this process's device."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m selfforcing_core.train CONFIG.json")
    config = read_config(argv[0])
    device = init_distributed()
    model = load_generator(config["model"], dtype=config.get("dtype", "auto"), device=device,
                           num_heads=config.get("num_heads"), head_dim=config.get("head_dim", 128),
                           text_len=config.get("text_len", 512))
    trainer = Trainer(model, load_clips(config["dataset"]), TrainConfig.from_dict(config.get("training", {})))
    output = config["output"]
    if trainer.resume(output) and trainer.rank == 0:
        print(f"resumed from {os.path.join(output, 'checkpoint.pt')} at step {trainer.step}", flush=True)

    def report(record):
        if trainer.rank == 0:
            losses = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step" and v is not None)
            print(f"step {record['step'] + 1}/{trainer.cfg.steps} {losses}", flush=True)
    trainer.run(checkpoint_dir=output, between_steps=report)
    if trainer.rank == 0:
        lora_path = os.path.join(output, config.get("lora_name", "lora.safetensors"))
        trainer.save_generator_lora(lora_path)
        print(f"saved {lora_path}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
