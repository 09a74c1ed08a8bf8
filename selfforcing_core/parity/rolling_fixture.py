"""Rolling Forcing fixtures (fixtures/rolling_forcing): the generator fixture layout, cases with windows.

Each case's ``config.json`` names ``num_frame_per_block``, ``max_attention_frames`` and
``kv_cache_frames``; ``inputs.safetensors`` holds the starting noise, the prompt, the step list
(its length is the window size) and the re-noise draws with ``renoise_index`` rows
(window, block, level) saying which block each draw re-noised after which window.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .compare import Comparison, compare
from .generator_fixture import case_dirs, load_fixture_model
from ..model import apply_rope
from ..rollout import NoiseSource, StreamSettings
from ..rolling_forcing import RollingForcingCache, sample_rolling


def detect(root: Path) -> bool:
    return ((root / "model_config.json").is_file() and (root / "weights.safetensors").is_file()
            and any("window_blocks" in json.loads((case / "config.json").read_text()) for case in case_dirs(root)))


def renoise_by_block(renoise: torch.Tensor, index: torch.Tensor) -> dict[int, dict[int, torch.Tensor]]:
    """Draws [n_draws, B, F, C, H, W] with rows (window, block, level) -> ``draws[block][window - block]``."""
    draws: dict[int, dict[int, torch.Tensor]] = {}
    for draw, (window, block, _) in zip(renoise, index.tolist()):
        draws.setdefault(block, {})[window - block] = draw
    return draws


def run_case(model, case: Path) -> tuple[torch.Tensor, RollingForcingCache]:
    """Reproduce one case: (``final_latents`` [1, F, C, H, W], the sampler's clean cache after the run)."""
    config = json.loads((case / "config.json").read_text())
    inputs = load_file(str(case / "inputs.safetensors"))
    noise = inputs["noise"]
    frames_per_block = config.get("num_frame_per_block", 3)
    if noise.shape[1] % frames_per_block:
        raise ValueError(f"{case.name}: {noise.shape[1]} noise frames are not whole blocks of {frames_per_block}")
    cache = RollingForcingCache(model, tuple(noise.shape[3:]), frames_per_block, config["kv_cache_frames"],
                                config["max_attention_frames"], noise.shape[0])
    latents = sample_rolling(
        model, inputs["prompt_embeds"], noise.shape[1] // frames_per_block, tuple(noise.shape[2:]),
        noise=NoiseSource(initial=noise, renoise=renoise_by_block(inputs["renoise"], inputs["renoise_index"])),
        settings=StreamSettings(shift=config.get("timestep_shift", 5.0), timesteps=inputs["denoising_step_list"],
                                frames_per_block=frames_per_block, sampler="rolling"),
        batch_size=noise.shape[0], cache=cache)
    return latents, cache


def run(root: Path) -> list[Comparison]:
    """``final_latents`` of every case and the clean cache (the fixtures store block 0's keys before
    RoPE, this cache at position 0: they are compared after rotating the fixture's to position 0)."""
    model = load_fixture_model(root)
    results = []
    for case in case_dirs(root):
        expected = load_file(str(case / "outputs.safetensors"))
        latents, cache = run_case(model, case)
        results.append(compare(case.name, "final_latents", latents, expected["final_latents"]))
        store = cache.store_cache
        valid, anchor = store.num_valid_frames * store.frame_seqlen, cache.block_frames * store.frame_seqlen
        if "kv_cache_layer0_k" in expected:
            keys = expected["kv_cache_layer0_k"]
            grid = (cache.block_frames, *(n // p for n, p in zip(latents.shape[3:], model.cfg.patch_size[1:])))
            anchor_keys = apply_rope(keys[:, :anchor].double(), model.rope.for_grid(range(grid[0]), *grid[1:], "cpu",
                                                                                  torch.float64))
            results.append(compare(case.name, "kv_cache_layer0_k", store.k[0, :, :valid],
                                   torch.cat([anchor_keys.to(keys.dtype), keys[:, anchor:]], dim=1)))
            results.append(compare(case.name, "kv_cache_layer0_v", store.v[0, :, :valid], expected["kv_cache_layer0_v"]))
    return results
