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


def test_loader_family_auto_takes_the_file_names_family_and_an_explicit_choice_wins_over_it():
    from selfforcing_core.families import AUTO_FAMILY, FAMILY_CHOICES, loader_family

    assert FAMILY_CHOICES[0] == AUTO_FAMILY
    assert FAMILY_CHOICES[1:] == tuple(family.name for family in FAMILIES.values())
    assert len(set(FAMILY_CHOICES)) == len(FAMILY_CHOICES)  # a name picks one family
    assert loader_family(AUTO_FAMILY, "longlive_base.pt") == (
        FAMILIES["longlive"], "LongLive (from the file name longlive_base.pt)")
    assert loader_family(AUTO_FAMILY, "my_model.safetensors")[0] is FAMILIES["self_forcing"]
    assert loader_family("Reward Forcing", "longlive_base.pt") == (
        FAMILIES["reward_forcing"], "Reward Forcing (chosen in the loader; the file name longlive_base.pt "
                                    "suggests LongLive)")
    assert loader_family("LongLive", "my_model.safetensors") == (
        FAMILIES["longlive"], "LongLive (chosen in the loader; the file name my_model.safetensors names no family)")
    for key, family in FAMILIES.items():
        assert loader_family(family.name, "self_forcing_dmd.pt")[0] is family, key
    with pytest.raises(ValueError, match="family 'Long Live' is not one of auto \\(from file name\\), Self Forcing"):
        loader_family("Long Live", "longlive_base.pt")


def test_the_samplers_preset_overrides_the_loaded_family_and_says_over_which():
    from selfforcing_core.families import sampler_family

    loaded = FAMILIES["longlive"], "LongLive (chosen in the loader; the file name x.pt names no family)"
    assert sampler_family(None, *loaded) == (
        FAMILIES["longlive"], "family: LongLive (chosen in the loader; the file name x.pt names no family), "
                              "from the loaded model")
    family, origin = sampler_family(FAMILIES["self_forcing"], *loaded)
    assert family is FAMILIES["self_forcing"]
    assert origin == ("family: Self Forcing, the sampler's steps preset (over the loaded model's LongLive "
                      "(chosen in the loader; the file name x.pt names no family))")


@pytest.mark.parametrize("key", ["self_forcing", "self_forcing_first_frame", "causal_forcing_framewise"])
def test_a_blocks_first_video_frame_is_the_first_frame_the_block_holds(key):
    from selfforcing_core.units import latent_frame_of

    family = FAMILIES[key]
    assert family.first_video_frame_of(0) == 0
    for block in range(1, 12):
        first = family.first_video_frame_of(block)
        assert family.block_of(latent_frame_of(first)) == block
        assert family.block_of(latent_frame_of(first - 1)) == block - 1


def test_switch_lines_name_each_switchs_block_frame_and_the_rule_it_ran():
    """A switch with its own re-cache (Prompt Schedule's prompt_switch) is described by that rule,
    the others by the stream's; no switch, no line."""
    prompt = torch.zeros(1, 4, 8)
    family = FAMILIES["longlive"]
    switches = [PromptSwitch(13, prompt), PromptSwitch(27, prompt, {"switch_recache": "none"}),
                PromptSwitch(40, prompt, {"switch_recache": "window", "global_sink": False})]
    assert family.describe_switches(switches) == (
        "prompt switches:\n"
        "- block 13 (video frame 153), the stream rule: re-cache the window in one call (sink kept)\n"
        "- block 27 (video frame 321), its own rule: keep the cached frames (no re-cache)\n"
        "- block 40 (video frame 477), its own rule: re-cache the window in one call (sink re-written)")
    assert "block 2 (video frame 21), the stream rule: replay the cached frames" in (
        FAMILIES["self_forcing"].describe_switches([PromptSwitch(2, prompt)]))
    assert family.describe_switches([]) == ""
