"""Command line trainer: prepare a dataset from clips, then train (one process or torchrun).

1. ``python -m selfforcing_core.train prepare CLIPS CACHE --encoder taew2_1.safetensors
   --prompt prompt.safetensors --negative negative.safetensors [--width 832 --height 480
   --latent-frames 21]`` encodes every clip window of the folder CLIPS into the dataset folder
   CACHE (``clips.prepare_clips``) with a TAEHV or Wan VAE file, using prompt-embedding files
   (``prompt_embeddings.py``) instead of a text encoder: one prompt for all clips, so caption
   files are ignored here (the dataset node embeds captions with the host's text encoder).
2. ``python -m selfforcing_core.train CONFIG.json`` trains; CONFIG is a JSON object::

    {"model": "self_forcing_dmd.safetensors",   # generator checkpoint (any layout load_generator reads)
     "dataset": "clips_cache/",                  # folder made by step 1 or the dataset node (index.json)
     "output": "runs/my_lora/",                  # checkpoint.pt and the result go here
     "num_heads": null, "text_len": 512, "dtype": "auto",   # optional model-loading options (dtype auto:
                                                 # fp32 weights, see load_for_training)
     "result_name": "my_lora.safetensors",       # optional, default lora.safetensors, or
                                                 # generator.safetensors with "finetune": "full"
     "training": {"steps": 600, "batch_size": 8, ...}}      # TrainConfig fields

Scaling out: ``torchrun --nproc_per_node N -m selfforcing_core.train CONFIG.json``; each process
takes ``batch_size / N`` samples of every global batch; adapter gradients are averaged, a fully
fine-tuned generator is sharded with FSDP (NCCL on GPUs, gloo on CPUs). A run resumes from
``<output>/checkpoint.pt`` when it exists.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from .checkpoint import load_generator
from .clips import load_clips, prepare_clips
from .codec_loading import load_codec
from .model import CausalWanModel
from .prompt_embeddings import load_prompt_embeddings
from .loss_curves import format_losses
from .trainer import Trainer, TrainConfig

KNOWN_KEYS = {"model", "dataset", "output", "num_heads", "head_dim", "text_len", "dtype", "result_name", "training"}


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


def prepare(argv):
    """The ``prepare`` command: clips folder -> dataset folder (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m selfforcing_core.train prepare",
                                     description="Encode a folder of clips into a training dataset folder.")
    parser.add_argument("clips", help="folder of videos (mp4/webm/gif/...) or image-sequence folders")
    parser.add_argument("cache", help="dataset folder to write (reused windows are not encoded again)")
    parser.add_argument("--encoder", required=True, help="TAEHV (taew2_1) or Wan 2.1 VAE weights with an encoder")
    parser.add_argument("--prompt", required=True, help="prompt-embedding file used for every clip")
    parser.add_argument("--negative", required=True, help="prompt-embedding file of the negative prompt")
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--latent-frames", type=int, default=21, help="latent frames per window (video: 1 + 4 (F - 1))")
    args = parser.parse_args(argv)
    codec = load_codec(args.encoder, device="cuda" if torch.cuda.is_available() else "cpu")

    def embedding(path):  # first entry's context [L, text_dim]
        return load_prompt_embeddings(path)[0][0][0]
    data = prepare_clips(args.clips, args.cache, codec.encode_video, width=args.width, height=args.height,
                         latent_frames=args.latent_frames, negative=embedding(args.negative),
                         prompt=embedding(args.prompt), encoder_name=os.path.basename(args.encoder))
    print(f"prepared {len(data.names)} windows of {args.latent_frames} latent frames in {args.cache}", flush=True)


def load_for_training(config: dict, device) -> CausalWanModel:
    """The generator a training run starts from. dtype "auto" means fp32 here on every device, not
    the inference choice (bf16 on GPUs and bf16 CPUs): the trained weights are the optimizer's
    master copy and must stay fp32 (16-bit weights drop updates below their rounding step); on
    CUDA the compute still runs in bf16 under autocast. An explicit "bf16" or "fp16" keeps a 16-bit
    frozen base for LoRA training (the adapters are fp32 either way)."""
    dtype = config.get("dtype", "auto")
    return load_generator(config["model"], dtype="fp32" if dtype == "auto" else dtype, device=device,
                          num_heads=config.get("num_heads"), head_dim=config.get("head_dim", 128),
                          text_len=config.get("text_len", 512))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        return prepare(argv[1:])
    if len(argv) != 1:
        raise SystemExit("usage: python -m selfforcing_core.train CONFIG.json\n"
                         "       python -m selfforcing_core.train prepare CLIPS CACHE --encoder FILE --prompt FILE "
                         "--negative FILE [--width W --height H --latent-frames F]")
    config = read_config(argv[0])
    device = init_distributed()
    model = load_for_training(config, device)
    trainer = Trainer(model, load_clips(config["dataset"]), TrainConfig.from_dict(config.get("training", {})))
    output = config["output"]
    if trainer.sharded and trainer.rank == 0:
        print(f"generator sharded with FSDP over {trainer.world_size} processes", flush=True)
    if trainer.resume(output) and trainer.rank == 0:
        print(f"resumed from {os.path.join(output, 'checkpoint.pt')} at step {trainer.step}", flush=True)

    def report(record):
        if trainer.rank == 0:
            print(f"step {record['step'] + 1}/{trainer.cfg.steps}: {format_losses([record])}", flush=True)
    trainer.run(checkpoint_dir=output, between_steps=report)
    default_name = "generator.safetensors" if trainer.cfg.finetune == "full" else "lora.safetensors"
    result = os.path.join(output, config.get("result_name", default_name))
    trainer.save_generator(result)
    if trainer.rank == 0:
        print(f"saved {result}", flush=True)
    if dist.is_initialized():
        dist.barrier()  # every rank is past its last collective and rank 0 has written the files
        dist.destroy_process_group()


def exit_worker():
    """End a torchrun worker after a successful run without Python's interpreter teardown.

    A normal exit can abort (SIGABRT, "terminate called without an active exception"): a gloo worker
    thread (pt_gloo_runloop) frees each finished collective after the waiting rank has moved on, and the
    barrier's work keeps the last all-gather's work alive until then. Python dropped the all-gather's
    output tensor first, so the tensor now owns its Python object and freeing it takes the GIL; once the
    interpreter is finalizing, Python (3.11 here) ends a thread that takes the GIL with pthread_exit, and
    that unwinding through the work's destructor calls std::terminate. destroy_process_group does not
    join those threads (the group outlives it). Everything is written and flushed by then, so the worker
    leaves with status 0 directly.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        exit_worker()
