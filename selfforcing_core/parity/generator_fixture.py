"""Generator fixtures of Self Forcing and LongLive: ``model_config.json`` + ``weights.safetensors`` + case folders.

Each case folder holds ``config.json`` (blocks, window, sink, prefill), ``inputs.safetensors``
(noise, re-noise draws, prompt embeddings, step list, optional prefill latents) and
``outputs.safetensors`` (``final_latents`` and intermediates) produced by the official pipeline.

Two layouts of the re-noise draws: ``renoise`` [num_blocks, steps - 1, B, 3, C, H, W] (uniform
blocks, fixtures/selfforcing) or ``renoise_flat`` [B, R, C, H, W], every draw concatenated along
frames in the order drawn, for plans whose blocks differ in frames or steps (frame-wise,
independent first frame, Causal Forcing's first-block step list: fixtures/selfforcing_framewise
and causal_forcing). The flat layout is split by the block plan the rollout computes from the
case's ``num_frame_per_block`` / ``independent_first_frame``; that plan is compared with the one
the official pipeline recorded (``block_start_frame``, ``block_num_frames``, ``block_num_steps``).
LongLive cases (``config.json`` names ``global_sink`` / ``use_infinite_attention``) add the cache
rules, a prompt switch (``prompt_embeds_2``, ``switch_block``) and a LoRA file (``lora.pt`` or
``lora.safetensors``, rank/alpha in ``config.json``: the file stores none).
"""
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from .compare import Comparison, compare
from ..checkpoint import load_generator
from ..families import LONGLIVE_RULES
from ..kv_cache import CacheRules
from ..lora import active_adapter, attach_lora
from ..model import WanConfig
from ..rollout import NoiseSource, PromptSwitch, StreamSettings, block_plan, sample_video


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


def cache_rules(config: dict) -> CacheRules:
    """Self Forcing's rules, or the LongLive family's (sink protection, one-call window re-cache) with
    the case's RoPE mode and ``global_sink``."""
    if "global_sink" not in config and "use_infinite_attention" not in config:
        return CacheRules()
    return replace(LONGLIVE_RULES, rope="relative" if config.get("use_infinite_attention") else "absolute",
                   global_sink=config.get("global_sink", True))


def lora_file(case: Path) -> Path | None:
    """The case's LoRA, LongLive's own ``lora.pt`` first."""
    return next((case / name for name in ("lora.pt", "lora.safetensors") if (case / name).is_file()), None)


def split_flat_renoise(flat: torch.Tensor, plan: list[int], steps: list[int]) -> list[list[torch.Tensor]]:
    """``renoise_flat`` [B, R, C, H, W] -> ``renoise[block][step]`` [B, plan[block], C, H, W]."""
    needed = sum(frames * (num_steps - 1) for frames, num_steps in zip(plan, steps))
    if flat.shape[1] != needed:
        raise ValueError(f"renoise_flat holds {flat.shape[1]} frames; the block plan {plan} with steps {steps} "
                         f"draws {needed}")
    draws, offset = [], 0
    for frames, num_steps in zip(plan, steps):
        draws.append([flat[:, offset + frames * s:offset + frames * (s + 1)] for s in range(num_steps - 1)])
        offset += frames * (num_steps - 1)
    return draws


def run_case(model, case: Path) -> tuple[torch.Tensor, object, dict]:
    """Reproduce one case: (``final_latents`` [1, P + F_gen, C, H, W], the KV cache after the run,
    the block plan used: ``block_start_frame``, ``block_num_frames``, ``block_num_steps`` [num_blocks])."""
    config = json.loads((case / "config.json").read_text())
    inputs = load_file(str(case / "inputs.safetensors"))
    window = config.get("local_attn_size", -1)
    noise = inputs["noise"]
    prefill = inputs.get("initial_latent")
    prefill_frames = 0 if prefill is None else prefill.shape[1]
    frames_per_block = config.get("num_frame_per_block", 3)
    first_block_frames = 1 if config.get("independent_first_frame") else None
    timesteps = inputs["denoising_step_list"]
    first_timesteps = inputs.get("denoising_step_list_first_block", timesteps)
    if "renoise_flat" in inputs:
        plan = block_plan(noise.shape[1], frames_per_block, None if prefill_frames else first_block_frames)
        steps = [len(first_timesteps)] + [len(timesteps)] * (len(plan) - 1)
        renoise = split_flat_renoise(inputs["renoise_flat"], plan, steps)
    else:
        plan = [frames_per_block] * config["num_blocks"]
        steps = [len(timesteps)] * len(plan)
        renoise = inputs["renoise"]
    num_frames = (0 if prefill is None else prefill.shape[1]) + noise.shape[1]
    kv_cache = model.new_kv_cache(*noise.shape[3:], capacity_frames=num_frames if window == -1 else window,
                                  sink_frames=config.get("sink_size", 0), rolling=window != -1,
                                  batch_size=noise.shape[0], rules=cache_rules(config))
    switches = []
    if "prompt_embeds_2" in inputs:
        switches = [PromptSwitch(int(inputs["switch_block"].reshape(-1)[0]), inputs["prompt_embeds_2"])]
    settings = StreamSettings(
        kv_window_frames=None if window == -1 else window,
        sink_frames=config.get("sink_size", 0),
        frames_per_block=frames_per_block,
        first_block_frames=first_block_frames,
        shift=config.get("timestep_shift", 5.0),
        timesteps=timesteps,
        first_block_timesteps=first_timesteps,
        prefill=prefill,
        prompt_switches=switches,
        context_timestep=config.get("context_noise", 0),
    )
    latents = sample_video(model, inputs["prompt_embeds"], len(plan), tuple(noise.shape[2:]),
                           noise=NoiseSource(initial=noise, renoise=renoise), settings=settings,
                           batch_size=noise.shape[0], kv_cache=kv_cache)
    starts = torch.tensor([0] + plan[:-1]).cumsum(0) + prefill_frames
    return latents, kv_cache, {"block_start_frame": starts, "block_num_frames": torch.tensor(plan),
                               "block_num_steps": torch.tensor(steps)}


def run(root: Path) -> list[Comparison]:
    model = load_fixture_model(root)
    results = []
    for case in case_dirs(root):
        expected = load_file(str(case / "outputs.safetensors"))
        lora = lora_file(case)
        attached = None
        if lora is not None:
            alpha = json.loads((case / "config.json").read_text()).get("lora_alpha")
            attached = attach_lora(model, lora, adapter=case.name, alpha=alpha)
        with active_adapter(model, case.name if lora is not None else None):
            latents, kv_cache, plan = run_case(model, case)
        if attached is not None:
            attached.set_strength(0.0)  # later cases run on the bare model
        for name, value in plan.items():
            if name in expected:  # recorded by fixtures whose blocks may differ
                results.append(compare(case.name, name, value, expected[name], atol=0, rtol=0))
        results.append(compare(case.name, "final_latents", latents, expected["final_latents"]))
        valid_tokens = kv_cache.num_valid_frames * kv_cache.frame_seqlen
        for name, buffer in (("kv_cache_layer0_k", kv_cache.k), ("kv_cache_layer0_v", kv_cache.v)):
            if name in expected:  # optional in a fixture root: compared when present
                results.append(compare(case.name, name, buffer[0, :, :valid_tokens], expected[name]))
    return results
