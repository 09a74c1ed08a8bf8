"""Rolling Forcing sampler: official fixtures, perturbations, other shapes, and exact special cases."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfforcing_core.parity import run_parity
from selfforcing_core.rollout import NoiseSource, StreamSettings, sample_video
from selfforcing_core.rolling_forcing import (RollingForcingCache, sample_rolling, stream_rolling, window_blocks,
                                              window_levels)
from selfforcing_core.schedule import FlowMatchSchedule
from support.files import write_model_root
from support.tiny import OTHER_TINY, tiny_model, tiny_prompt

LATENT = (16, 8, 6)


def rolling_settings(timesteps, frames_per_block=3) -> StreamSettings:
    return StreamSettings(timesteps=timesteps, frames_per_block=frames_per_block, sampler="rolling")


def test_rolling_forcing_fixtures_are_reproduced(fixtures_dir):
    comparisons = run_parity(fixtures_dir / "rolling_forcing")
    assert {c.case for c in comparisons} >= {"short", "long", "cf_longvideo_4step"}
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons]
    assert {c.tensor for c in comparisons} == {"final_latents", "kv_cache_layer0_k", "kv_cache_layer0_v"}


def test_parity_fails_on_perturbed_rolling_inputs_and_outputs(fixtures_dir, tmp_path):
    """The last re-noise draw of ``short`` (the quirk case) or its expected latents changed: it fails."""
    for label, filename, name, change in (
            ("renoise", "inputs.safetensors", "renoise", lambda t: torch.cat([t[:-1], t[-1:] + 0.01])),
            ("output", "outputs.safetensors", "final_latents", lambda t: t + 1e-3 * (t > 0))):
        root = tmp_path / label
        root.mkdir()
        for name_ in ("weights.safetensors", "model_config.json"):
            shutil.copy(fixtures_dir / "rolling_forcing" / name_, root / name_)
        shutil.copytree(fixtures_dir / "rolling_forcing" / "short", root / "short")
        tensors = load_file(str(root / "short" / filename))
        tensors[name] = change(tensors[name])
        save_file(tensors, str(root / "short" / filename))
        final = [c for c in run_parity(root) if c.tensor == "final_latents"]
        assert len(final) == 1 and not final[0].passed and final[0].max_abs_error > 1e-4, final[0].line()


def test_parity_reproduces_rolling_roots_with_other_steps_windows_and_shapes(tmp_path):
    """3 steps (window of 3 blocks), 2-frame blocks, a 10-frame cache and 8-frame attention view,
    other heads, latent size and batch; expected from a float64 run of the sampler, draws indexed
    by the regular-video rule (block b re-noised after window b + level)."""
    cfg = OTHER_TINY
    root = tmp_path / "rolling"
    model = write_model_root(root, cfg)
    num_blocks, fpb, steps, batch, hw = 7, 2, 3, 2, (6, 4)
    case = {"num_frame_per_block": fpb, "window_blocks": steps, "max_attention_frames": 8, "kv_cache_frames": 10,
            "timestep_shift": 5.0}
    (root / "case").mkdir()
    (root / "case" / "config.json").write_text(json.dumps(case))
    g = torch.Generator().manual_seed(4)
    index = torch.tensor([[block + level, block, level] for block in range(num_blocks) for level in range(steps - 1)])
    index = index[torch.argsort(index[:, 0] * num_blocks + index[:, 1])]  # window-major, blocks ascending
    inputs = {"noise": torch.randn(batch, num_blocks * fpb, 16, *hw, generator=g),
              "prompt_embeds": torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g),
              "renoise": torch.randn(len(index), batch, fpb, 16, *hw, generator=g), "renoise_index": index,
              "denoising_step_list": FlowMatchSchedule(5.0).warp([1000, 667, 333])}
    save_file(inputs, str(root / "case" / "inputs.safetensors"))
    draws = {}
    for draw, (_, block, level) in zip(inputs["renoise"], index.tolist()):
        draws.setdefault(block, {})[level] = draw.double()
    model = model.double()
    expected = sample_rolling(model, inputs["prompt_embeds"].double(), num_blocks, (16, *hw),
                              noise=NoiseSource(initial=inputs["noise"].double(), renoise=draws),
                              settings=rolling_settings(inputs["denoising_step_list"], frames_per_block=fpb),
                              cache=RollingForcingCache(model, hw, fpb, 10, 8, batch))
    save_file({"final_latents": expected.float()}, str(root / "case" / "outputs.safetensors"))
    comparisons = run_parity(root)
    assert [c.tensor for c in comparisons] == ["final_latents"]
    assert comparisons[0].passed and comparisons[0].max_abs_error < 1e-4, comparisons[0].line()


def test_window_levels_regular_and_short_video():
    """Regular video: the newest block at level 0, the oldest at n - 1. Three blocks and five steps:
    the official levels (block 0 never passes level 2; block 2 fed at level 0 three times)."""
    assert window_levels(6, *window_blocks(6, 10, 5)) == {2: 4, 3: 3, 4: 2, 5: 1, 6: 0}
    short = [window_levels(w, *window_blocks(w, 3, 5)) for w in range(3 + 5 - 1)]
    assert [levels.get(0) for levels in short] == [0, 1, 2, 2, 2, None, None]
    assert [levels.get(1) for levels in short] == [None, 0, 1, 1, 1, 4, None]
    assert [levels.get(2) for levels in short] == [None, None, 0, 0, 0, 3, 4]


def test_one_step_rolling_forcing_with_a_wide_view_equals_one_step_self_forcing():
    """A window of one block never re-positions the anchor when the view holds every cached frame:
    the sampler is then Self Forcing with the list [1000] and a global cache."""
    model, prompt = tiny_model(), tiny_prompt()
    timesteps = FlowMatchSchedule(5.0).warp([1000])
    rolling = sample_rolling(model, prompt, 4, LATENT, noise=NoiseSource(torch.Generator().manual_seed(2)),
                             settings=rolling_settings(timesteps), cache=RollingForcingCache(model, LATENT[1:], 3, 12, 12))
    self_forcing = sample_video(model, prompt, 4, LATENT, noise=NoiseSource(torch.Generator().manual_seed(2)),
                                settings=StreamSettings(timesteps=timesteps))
    torch.testing.assert_close(rolling, self_forcing, atol=0, rtol=0)  # the same calls on the same shapes


def test_blocks_leave_in_order_when_they_leave_the_window_and_an_endless_stream_runs():
    model, prompt = tiny_model(), tiny_prompt()
    timesteps = FlowMatchSchedule(5.0).warp([1000, 750, 500])
    seen, calls = [], []
    model.register_forward_hook(lambda module, args, output: calls.append(output.shape[1]))
    stream = stream_rolling(model, prompt, None, LATENT, noise=NoiseSource(torch.Generator().manual_seed(0)),
                            settings=rolling_settings(timesteps), cache=RollingForcingCache(model, LATENT[1:], 3, 9, 12),
                            callback=lambda info: seen.append((info["block"], info["start_frame"])))
    first = next(stream)
    # the first block leaves after 3 windows: joint calls over 1, 2, 3 blocks, each followed by an update
    assert calls == [3, 3, 6, 3, 9, 3] and seen == [(0, 0)]
    blocks = [first] + [next(stream) for _ in range(4)]  # an endless stream: evictions beyond the 9-frame cache
    assert seen == [(b, 3 * b) for b in range(5)] and all(b.shape == (1, 3, *LATENT) for b in blocks)
    assert len(calls) == 2 * 7 and calls[-2:] == [9, 3]  # one joint and one update call per window
    with pytest.raises(ValueError, match="use at least 12"):
        next(stream_rolling(model, prompt, 2, LATENT, noise=NoiseSource(torch.Generator().manual_seed(0)),
                            settings=rolling_settings(timesteps), cache=RollingForcingCache(model, LATENT[1:], 3, 24, 9)))


def test_settings_the_rolling_sampler_cannot_honour_are_refused():
    model, prompt = tiny_model(), tiny_prompt()
    refused = [StreamSettings(sampler="rolling", prefill=torch.zeros(1, 3, *LATENT)),
               StreamSettings(sampler="rolling", first_block_frames=1)]
    for settings in refused:
        with pytest.raises(ValueError, match="takes no prefill, prompt switches or first-block plan"):
            next(stream_rolling(model, prompt, 4, LATENT, noise=NoiseSource(torch.Generator()), settings=settings))
