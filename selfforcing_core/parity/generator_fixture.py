"""Self Forcing generator fixtures: ``model_config.json`` + ``weights.safetensors`` + case folders.

Each case folder holds ``config.json`` (blocks, window, sink, prefill), ``inputs.safetensors``
(noise, re-noise draws, prompt embeddings, step list, optional prefill latents) and
``outputs.safetensors`` (``final_latents`` and intermediates) produced by the official pipeline.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import Comparison, compare
from ..checkpoint import load_generator
from ..model import WanConfig
from ..rollout import NoiseSource, sample_video
from ..schedule import FlowMatchSchedule


def detect(root: Path) -> bool:
    return (root / "model_config.json").is_file() and (root / "weights.safetensors").is_file()


def load_fixture_model(root: Path):
    """The fixture's model, rebuilt from ``model_config.json`` and ``weights.safetensors``."""
    model_config = json.loads((root / "model_config.json").read_text())
    cfg = WanConfig.from_json(model_config["model"])
    model = load_generator(root / "weights.safetensors", dtype="fp32", num_heads=cfg.num_heads,
                           text_len=cfg.text_len)
    if model.cfg != cfg:
        raise SystemExit(f"parity: weights do not match model_config.json: inferred {model.cfg}, declared {cfg}")
    return model


def case_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "config.json").is_file() and (p / "inputs.safetensors").is_file())


def run_case(model, case: Path) -> tuple[torch.Tensor, object]:
    """Reproduce one case: (``final_latents`` [1, P + F_gen, C, H, W], the KV cache after the run)."""
    config = json.loads((case / "config.json").read_text())
    inputs = load_file(str(case / "inputs.safetensors"))
    window = config.get("local_attn_size", -1)
    noise = inputs["noise"]
    prefill = inputs.get("initial_latent")
    num_frames = (0 if prefill is None else prefill.shape[1]) + noise.shape[1]
    kv_cache = model.new_kv_cache(*noise.shape[3:], capacity_frames=num_frames if window == -1 else window,
                                  sink_frames=config.get("sink_size", 0), rolling=window != -1,
                                  batch_size=noise.shape[0])
    latents = sample_video(
        model, inputs["prompt_embeds"], config["num_blocks"], tuple(noise.shape[2:]),
        noise=NoiseSource(initial=noise, renoise=inputs["renoise"]),
        timesteps=inputs["denoising_step_list"],
        schedule=FlowMatchSchedule(config.get("timestep_shift", 5.0)),
        context_timestep=config.get("context_noise", 0),
        kv_window_frames=None if window == -1 else window,
        sink_frames=config.get("sink_size", 0),
        prefill=prefill,
        frames_per_block=config.get("num_frame_per_block", 3),
        batch_size=noise.shape[0],
        kv_cache=kv_cache,
    )
    return latents, kv_cache


def run(root: Path) -> list[Comparison]:
    model = load_fixture_model(root)
    results = []
    for case in case_dirs(root):
        expected = load_file(str(case / "outputs.safetensors"))
        latents, kv_cache = run_case(model, case)
        results.append(compare(case.name, "final_latents", latents, expected["final_latents"]))
        valid_tokens = kv_cache.num_valid_frames * kv_cache.frame_seqlen
        for name, buffer in (("kv_cache_layer0_k", kv_cache.k), ("kv_cache_layer0_v", kv_cache.v)):
            if name in expected:  # optional in a fixture root: compared when present
                results.append(compare(case.name, name, buffer[0, :, :valid_tokens], expected[name]))
    return results
