"""Checkpoint families as presets: choosing LongLive yields exactly LongLive's cache rules (its
fixtures reproduce from the family's settings alone), overrides change only what they name, and a
file name suggests a family."""
import json

import pytest
import torch
from safetensors.torch import load_file

from selfforcing_core.families import FAMILIES, LONGLIVE_RULES, detect_family
from selfforcing_core.kv_cache import CacheRules
from selfforcing_core.parity.generator_fixture import cache_rules, load_fixture_model
from selfforcing_core.rollout import NoiseSource, PromptSwitch, sample_video


@pytest.mark.parametrize("case, overrides", [
    ("infinite", {}),
    ("switch", {"rope": "absolute"}),
    ("switch_noglobalsink", {"rope": "absolute", "global_sink": False}),
])
def test_longlive_family_settings_reproduce_the_longlive_fixtures(fixtures_dir, case, overrides):
    """The family's own settings (window scaled to the fixture's 9 frames, no cache built by hand)
    give LongLive's final latents: sink 3, sink protection, window re-cache, relative RoPE."""
    root = fixtures_dir / "longlive"
    config = json.loads((root / case / "config.json").read_text())
    inputs = load_file(str(root / case / "inputs.safetensors"))
    expected = load_file(str(root / case / "outputs.safetensors"))["final_latents"]
    family = FAMILIES["longlive"].overridden(kv_window_frames=config["local_attn_size"], **overrides)
    switches = ([PromptSwitch(int(inputs["switch_block"].reshape(-1)[0]), inputs["prompt_embeds_2"])]
                if "prompt_embeds_2" in inputs else [])
    settings = family.settings(prompt_switches=switches)
    assert torch.allclose(torch.as_tensor(settings.timesteps), inputs["denoising_step_list"])
    noise = inputs["noise"]
    latents = sample_video(load_fixture_model(root), inputs["prompt_embeds"], config["num_blocks"],
                           tuple(noise.shape[2:]), noise=NoiseSource(initial=noise, renoise=inputs["renoise"]),
                           settings=settings)
    assert (latents - expected).abs().max() < 1e-4  # the parity command's tolerance


def test_longlive_family_rules_are_the_ones_parity_checks():
    longlive = FAMILIES["longlive"]
    assert (longlive.kv_window_frames, longlive.sink_frames, longlive.checkpoint_keys[0]) == (12, 3, "generator")
    assert longlive.settings().cache_rules == LONGLIVE_RULES == cache_rules(
        {"global_sink": True, "use_infinite_attention": True})
    assert LONGLIVE_RULES == CacheRules(rope="relative", protect_sink=True, switch_recache="window", global_sink=True)
    reward = FAMILIES["reward_forcing"].settings()
    assert (reward.kv_window_frames, reward.sink_frames, reward.cache_rules) == (9, 3, CacheRules())
    assert FAMILIES["custom"].settings().cache_rules == CacheRules()


def test_overrides_change_only_what_they_name_and_the_description_says_so():
    family = FAMILIES["longlive"].overridden(kv_window_frames=21, sink_frames=0, global_sink=False)
    settings = family.settings()
    assert (settings.kv_window_frames, settings.sink_frames) == (21, 0)
    assert settings.cache_rules == CacheRules(rope="relative", protect_sink=True, switch_recache="window",
                                              global_sink=False)
    assert family.name == "LongLive (window 21, sink 0, global_sink False)"
    assert "KV window 21 frames, sink 0, relative RoPE, sink protected" in family.describe()
    assert "sink re-written" in family.describe()
    assert FAMILIES["longlive"].overridden(rope="relative", kv_window_frames=12) is FAMILIES["longlive"]
    assert "global KV cache, absolute RoPE, switches replay the cached frames" in FAMILIES["self_forcing"].describe()
    no_recache = FAMILIES["longlive"].overridden(switch_recache="none").describe()
    assert "switches keep the cached frames (no re-cache)" in no_recache and "re-cache the window" not in no_recache


@pytest.mark.parametrize("file_name, family", [
    ("longlive_base.pt", "longlive"),
    ("LongLive-1.3B.safetensors", "longlive"),
    ("rewardforcing.pt", "reward_forcing"),
    ("Reward-Forcing-T2V-1.3B.safetensors", "reward_forcing"),
    ("rolling_forcing_dmd.pt", "rolling_forcing"),
    ("causal_forcing_framewise.pt", "causal_forcing_framewise"),
    ("causal_forcing_chunkwise.pt", "causal_forcing_chunkwise"),
    ("self_forcing_dmd.pt", "self_forcing"),
    ("wan2.1_t2v_1.3B_fp16.safetensors", None),
])
def test_family_is_suggested_by_the_file_name(file_name, family):
    assert detect_family(file_name) == family


def test_a_file_name_without_a_family_loads_as_self_forcing_and_says_so():
    from selfforcing_core.families import family_of_file

    assert family_of_file("longlive_base.pt") == (FAMILIES["longlive"], "LongLive (from the file name longlive_base.pt)")
    assert family_of_file("my_model.safetensors") == (
        FAMILIES["self_forcing"], "Self Forcing (the file name my_model.safetensors names no family)")
