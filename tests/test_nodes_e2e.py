"""The sampler, loader and decoder nodes end to end in a real ComfyUI server (POST /prompt)."""
import re
import uuid

import av
import pytest
import torch

from selfforcing_core.kv_cache import CacheRules
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import max_latent_frames
from selfforcing_core.prompt_embeddings import save_prompt_embeddings
from support.comfy_host import (PromptExecutionError, PromptValidationError, run_watching,
                                sampler_graph, saved_video)
from support.decoder_weights import taehv_state_dict
from support.files import video_frames
from support.tiny import HOST_TINY

pytestmark = pytest.mark.host

def test_streaming_sampler_to_mp4_has_the_requested_frames_and_size(server):
    entry = server.run(sampler_graph(width=64, height=48, length=25), timeout=300)
    frames = video_frames(saved_video(server, entry))
    assert len(frames) == 25 and frames[0].shape == (48, 64, 3)


def test_progress_and_a_preview_reach_the_ui_after_every_block(server):
    """What the browser sees over the websocket: one progress step and one preview image per block."""
    graph = sampler_graph(length=25, seed=uuid.uuid4().int % 2**32)  # 3 blocks; a new seed: not a cached result
    outcome, progress, previews, _ = run_watching(server, graph, "4")
    assert outcome == "execution_success"
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert previews >= 3


def test_frame_wise_preset_reports_progress_and_a_preview_per_latent_frame(server):
    """Causal Forcing frame-wise: 13 frames = 4 latent frames = 4 one-frame blocks, each decoded,
    previewed and counted as it is made (the first in 4 steps, the others in 2)."""
    graph = sampler_graph(length=13, seed=uuid.uuid4().int % 2**32)
    graph["4"]["inputs"].update(steps="Causal Forcing frame-wise, 2 steps")
    outcome, progress, previews, _ = run_watching(server, graph, "4")
    assert outcome == "execution_success"
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert previews >= 4


def test_rolling_forcing_preset_reports_each_block_as_it_leaves_the_window(server):
    graph = sampler_graph(length=61, seed=uuid.uuid4().int % 2**32)  # 16 latent frames: 6 blocks
    graph["4"]["inputs"].update(steps="Rolling Forcing")
    outcome, progress, previews, _ = run_watching(server, graph, "4")
    assert outcome == "execution_success"
    assert progress == [(block, 6) for block in range(1, 7)] and previews >= 6
    graph["4"]["inputs"].update(length=25)  # 7 latent frames: shorter than the 5-block window
    with pytest.raises(PromptExecutionError, match="at least 57 frames long"):
        server.run(graph, timeout=300)


def test_longlive_preset_with_cache_rules_runs_a_switch_and_info_states_what_ran(server):
    """LongLive preset (window 0: its window 12 and sink 3) past its first eviction with a prompt
    switch, sink re-written on the switch by the Cache Rules node; info names every rule that ran."""
    graph = sampler_graph(length=61, extra={  # 16 latent frames: the 12-frame window evicts
        "9": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "dog.safetensors"}},
        "10": {"class_type": "SelfForcingPromptSchedule", "inputs": {"conditioning": ["9", 0], "start_frame": 37}},
        "11": {"class_type": "SelfForcingCacheRules",
               "inputs": {"rope": "preset", "sink_protection": "preset", "prompt_switch": "re-cache window, re-write sink"}},
    })
    graph["4"]["inputs"].update(steps="LongLive", prompt_schedule=["10", 0], cache_rules=["11", 0])
    entry = server.run(graph, timeout=300)
    assert len(video_frames(saved_video(server, entry))) == 61
    info = entry["outputs"]["4"]["selfforcing_live"][0]["info"]
    assert info.startswith("LongLive (global_sink False): 3 latent frames per block"), info
    assert ("KV window 12 frames, sink 3, relative RoPE, sink protected, switches re-cache the window in one call "
            "(sink re-written), weights generator or generator_ema") in info, info


def test_unmerged_lora_strength_changes_in_the_sampler_without_reloading_the_model(server):
    """lora_mode unmerged (LongLive's lora.pt): the sampler's lora_strength scales it; changing it
    re-runs only the sampler (the loader's output is reused), and strength 0 is the bare model."""
    graph = sampler_graph(length=13, extra={
        "12": {"class_type": "SelfForcingLora", "inputs": {"lora_name": "longlive_lora.pt", "strength": 1.0}}})
    graph["1"]["inputs"].update(loras=["12", 0], lora_mode="unmerged")
    graph["4"]["inputs"]["lora_strength"] = 0.0
    off = server.run(graph, timeout=300)
    graph["4"]["inputs"]["lora_strength"] = 1.0
    on = server.run(graph, timeout=300)
    cached = next(data["nodes"] for kind, data in on["status"]["messages"] if kind == "execution_cached")
    assert "1" in cached and "4" not in cached
    assert "unmerged LoRA at strength 1 (1 x 1)" in on["outputs"]["4"]["selfforcing_live"][0]["info"]
    plain = video_frames(saved_video(server, server.run(sampler_graph(length=13), timeout=300)))
    assert all((a == b).all() for a, b in zip(video_frames(saved_video(server, off)), plain))
    assert any((a != b).any() for a, b in zip(video_frames(saved_video(server, on)), plain))


def test_the_model_family_preset_runs_what_the_loader_found_in_the_file_name(server):
    for model, family in (("longlive_tiny.safetensors", "LongLive: "), ("sf_tiny.safetensors", "Self Forcing: ")):
        graph = sampler_graph(length=13, model=model, extra={"7": {"class_type": "PreviewAny",
                                                                   "inputs": {"source": ["1", 1]}}})
        graph["4"]["inputs"]["steps"] = "the model's family (loader)"
        entry = server.run(graph, timeout=300)
        assert entry["outputs"]["4"]["selfforcing_live"][0]["info"].startswith(family)
        assert f"family: {family[:-2]} (" in str(entry["outputs"]["7"]), entry["outputs"]["7"]


def test_the_loaders_family_choice_runs_in_the_model_family_preset_and_info_says_where_it_came_from(server):
    """sf_tiny.safetensors names no family (auto: Self Forcing). Chosen as LongLive in the loader, the
    model's-family preset runs exactly the LongLive preset (window 12 evicts in 16 latent frames, so
    the video differs from Self Forcing's), both infos say it was chosen; a preset named in the
    sampler wins over the loader's family and says over which."""
    def run(family, steps):
        graph = sampler_graph(length=61, extra={"7": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}})
        graph["1"]["inputs"]["family"] = family
        graph["4"]["inputs"]["steps"] = steps
        entry = server.run(graph, timeout=300)
        return (video_frames(saved_video(server, entry)), entry["outputs"]["4"]["selfforcing_live"][0]["info"],
                str(entry["outputs"].get("7")))  # a loader the server has cached shows no PreviewAny output

    chosen = "LongLive (chosen in the loader; the file name sf_tiny.safetensors names no family)"
    frames, info, loader_info = run("LongLive", "the model's family (loader)")
    assert info.startswith("LongLive: 3 latent frames per block"), info
    assert f"family: {chosen}, from the loaded model" in info, info
    assert f"family: {chosen}, for the samplers' steps" in loader_info, loader_info
    assert "KV window 12 frames, sink 3, relative RoPE, sink protected" in loader_info, loader_info
    preset_frames, preset_info, _ = run("auto (from file name)", "LongLive")
    assert all((a == b).all() for a, b in zip(frames, preset_frames))
    assert ("family: LongLive, the sampler's steps preset (over the loaded model's Self Forcing (the file name "
            "sf_tiny.safetensors names no family))") in preset_info, preset_info
    auto_frames, auto_info, _ = run("auto (from file name)", "the model's family (loader)")
    assert auto_info.startswith("Self Forcing: ") and "global KV cache" in auto_info, auto_info
    assert any((a != b).any() for a, b in zip(frames, auto_frames))
    _, overridden_info, _ = run("LongLive", "4 steps, shift 5 (paper)")
    assert overridden_info.startswith("Self Forcing: "), overridden_info
    assert f"the sampler's steps preset (over the loaded model's {chosen})" in overridden_info, overridden_info


def test_until_stop_needs_a_window_of_its_own_or_of_the_preset(server):
    graph = sampler_graph(length=0)
    graph["4"]["inputs"].update(steps="Custom")
    with pytest.raises(PromptValidationError, match="length 0 runs until Stop and needs a rolling KV window"):
        server.queue_prompt(graph)
    graph["4"]["inputs"].update(steps="LongLive", kv_window_frames=5, sink_frames=3)
    with pytest.raises(PromptValidationError, match="kv_window_frames 5 with sink_frames 3 leaves no room"):
        server.queue_prompt(graph)
    # The model's family is known only when the loader has run: its window is checked then, before compute.
    graph["4"]["inputs"].update(steps="the model's family (loader)", kv_window_frames=0, sink_frames=0)
    with pytest.raises(PromptExecutionError, match="length 0 runs until stopped and needs a rolling KV window"):
        server.run(graph, timeout=300)


def test_loader_loads_the_checkpoint_entry_its_family_prefers(server):
    """Official training .pt files holding 'generator' and 'generator_ema': causal_forcing.pt (the
    chunk-wise file's name) loads 'generator', framewise/causal_forcing.pt and self_forcing_dmd.pt
    load 'generator_ema' (but 'generator' with LongLive chosen in the loader), and the loader's info
    says which (test_checkpoint.py checks the weights)."""
    training_dict = {name: {f"model.{k}": v for k, v in CausalWanModel(HOST_TINY).state_dict().items()}
                     for name in ("generator", "generator_ema")}
    for name in ("causal_forcing.pt", "framewise/causal_forcing.pt", "self_forcing_dmd.pt"):
        path = server.model_dir("diffusion_models") / "entries" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(training_dict, path)

    def loader_info(model_name, family="auto (from file name)"):
        graph = {"1": {"class_type": "SelfForcingModelLoader",
                       "inputs": {"model_name": model_name, "weight_dtype": "fp32", "device": "default",
                                  "family": family}},
                 "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
        return server.run(graph, timeout=300)["outputs"]["2"]["text"][0]

    assert "entry 'generator' (the family prefers generator over generator_ema)" in loader_info(
        "entries/causal_forcing.pt")
    assert "entry 'generator_ema' (the family prefers generator_ema over generator)" in loader_info(
        "entries/framewise/causal_forcing.pt")
    assert "entry 'generator_ema'" in loader_info("entries/self_forcing_dmd.pt")
    # A family chosen in the loader picks the entry, over the file name's.
    assert "entry 'generator' (the family prefers generator over generator_ema)" in loader_info(
        "entries/self_forcing_dmd.pt", "LongLive")


def test_sampler_latent_decodes_with_the_hosts_own_vae_decode(server):
    graph = sampler_graph(length=13, decoder=None, extra={
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["7", 0]}},
        "5": {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 16.0}},
    })
    frames = video_frames(saved_video(server, server.run(graph, timeout=300)))
    assert len(frames) == 13 and frames[0].shape == (48, 64, 3)


def test_prompt_schedule_and_rolling_window_run(server):
    graph = sampler_graph(length=37, window=6, sink=3, extra={
        "9": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "dog.safetensors"}},
        "10": {"class_type": "SelfForcingPromptSchedule",
               "inputs": {"conditioning": ["9", 0], "start_frame": 13}},
    })
    graph["4"]["inputs"]["prompt_schedule"] = ["10", 0]
    switched = video_frames(saved_video(server, server.run(graph, timeout=300)))
    del graph["4"]["inputs"]["prompt_schedule"]
    plain = video_frames(saved_video(server, server.run(graph, timeout=300)))
    assert len(switched) == len(plain) == 37
    # Frames before the switch (block 0: video frames 0..8 after TAEHV's start-up) are identical.
    assert all((a == b).all() for a, b in zip(switched[:9], plain[:9]))
    assert any((a != b).any() for a, b in zip(switched[13:], plain[13:]))
    # The switch's own prompt_switch runs as the sampler's Cache Rules choice would, for that switch.
    graph["4"]["inputs"]["prompt_schedule"] = ["10", 0]
    graph["10"]["inputs"]["prompt_switch"] = "no re-cache"
    entry = server.run(graph, timeout=300)
    own = video_frames(saved_video(server, entry))
    # info names the switch (start_frame 13 -> block 1, from video frame 9) and the rule it ran.
    info = entry["outputs"]["4"]["selfforcing_live"][0]["info"]
    assert "replay the cached frames" in info.splitlines()[0], info  # the stream's rule ...
    assert "prompt switches:\n- block 1 (video frame 9), its own rule: keep the cached frames (no re-cache)" in info
    graph["10"]["inputs"]["prompt_switch"] = "cache rules (sampler)"
    graph["11"] = {"class_type": "SelfForcingCacheRules",
                   "inputs": {"rope": "preset", "sink_protection": "preset", "prompt_switch": "no re-cache"}}
    graph["4"]["inputs"]["cache_rules"] = ["11", 0]
    entry = server.run(graph, timeout=300)
    sampler_wide = video_frames(saved_video(server, entry))
    assert ("- block 1 (video frame 9), the stream rule: keep the cached frames (no re-cache)"
            in entry["outputs"]["4"]["selfforcing_live"][0]["info"])
    assert all((a == b).all() for a, b in zip(own, sampler_wide))
    assert any((a != b).any() for a, b in zip(own[13:], switched[13:]))


def test_interrupt_stops_the_stream_and_the_next_run_works(server):
    """POST /interrupt as soon as the first block is shown: the stream stops within a block or two
    (it is long enough to run for minutes otherwise) and the next run works."""
    long_run = sampler_graph(width=256, height=256, length=2001, window=9, seed=uuid.uuid4().int % 2**32)
    interrupted_at = []

    def interrupt_after_first_block(block):
        if not interrupted_at:
            interrupted_at.append(block)
            server.interrupt()

    outcome, progress, _, _ = run_watching(server, long_run, "4", on_progress=interrupt_after_first_block)
    assert outcome == "execution_interrupted"
    assert interrupted_at == [1] and progress[-1][0] <= 3 and progress[-1][1] == 167
    entry = server.run(sampler_graph(length=13), timeout=300)
    assert len(video_frames(saved_video(server, entry))) == 13


def test_size_not_a_multiple_of_16_is_refused_before_running(server):
    with pytest.raises(PromptValidationError, match="width 70 is not a positive multiple of 16"):
        server.queue_prompt(sampler_graph(width=70))
    with pytest.raises(PromptValidationError, match="4n \\+ 1"):
        server.queue_prompt(sampler_graph(length=24))


def test_window_without_room_for_a_block_is_refused_before_running(server):
    with pytest.raises(PromptValidationError, match="kv_window_frames 5 with sink_frames 3 leaves no room"):
        server.queue_prompt(sampler_graph(window=5, sink=3))


def test_lengths_beyond_what_the_rope_table_can_place_are_refused_at_validation(server):
    """The length widget's maximum is the last whole block the RoPE table can place (that block's
    positions fit: test_model); one block more is refused at once, not after minutes of compute."""
    longest = server.object_info("SelfForcingStreamingSampler")["input"]["required"]["length"][1]["max"]
    assert longest == 1 + 4 * (max_latent_frames(CacheRules(), None) - 1)
    for node in ("SelfForcingStreamingSampler", "SelfForcingKeyframeSampler"):
        graph = sampler_graph(length=longest + 4)
        graph["4"]["class_type"] = node
        with pytest.raises(PromptValidationError, match=f"length {longest + 4} is above its maximum {longest}"):
            server.queue_prompt(graph)


def test_checkpoint_of_another_model_is_a_clear_error(server):
    with pytest.raises(PromptExecutionError, match="unrecognised checkpoint layout \\(a Wan VAE\\)"):
        server.run(sampler_graph(model="not_a_generator.safetensors"), timeout=300)


def test_missing_model_file_is_a_validation_error(server):
    with pytest.raises(PromptValidationError, match="not found in models/diffusion_models"):
        server.queue_prompt(sampler_graph(model="nowhere.safetensors"))
    with pytest.raises(PromptValidationError, match="not found"):
        server.queue_prompt(sampler_graph(decoder="vae_approx/nowhere.safetensors"))
    # a file of another model folder is not a decoder choice, nor a path out of the folder
    for name in ("diffusion_models/sf_tiny.safetensors", "vae_approx/../diffusion_models/sf_tiny.safetensors"):
        with pytest.raises(PromptValidationError, match="not found in models/vae_approx or models/vae|not found in models/vae_approx"):
            server.queue_prompt(sampler_graph(decoder=name))


def test_fp8_weights_with_offload_and_compile_options_run(server):
    graph = sampler_graph(length=13, seed=21, extra={
        "11": {"class_type": "SelfForcingRuntimeOptions",
               "inputs": {"torch_compile": False, "offload_blocks": 1, "fp8_granularity": "channel"}},
    })
    graph["1"]["inputs"].update(fp8="e4m3fn", options=["11", 0])
    frames = video_frames(saved_video(server, server.run(graph, timeout=300)))
    assert len(frames) == 13 and frames[0].shape == (48, 64, 3)
    log = server.log()
    assert "FP8: 20 linear layers in e4m3fn" in log and "offload: 1/2 blocks" in log


def test_damaged_weight_files_give_the_packs_errors_naming_the_file_and_the_tensor(server):
    """NaN / Inf in a model, LoRA, decoder or prompt embedding, a zero-byte or non-tensor LoRA, and a
    LoRA aimed at a whole block: each run fails with the pack's own error (no install path in its
    type name) naming the file, never a raw library error or a silent black video."""
    sd = CausalWanModel(HOST_TINY).state_dict()
    sd["blocks.1.ffn.2.weight"][0, 0] = float("nan")
    server.write_safetensors("diffusion_models", "nan_model.safetensors", sd)
    decoder = taehv_state_dict()
    decoder["decoder.1.weight"].view(-1)[0] = float("inf")
    server.write_safetensors("vae_approx", "taew2_1_inf.safetensors", decoder)
    context = torch.full((1, 12, HOST_TINY.text_dim), float("nan"))
    save_prompt_embeddings(server.model_dir("prompt_embeddings") / "nan_prompt.safetensors", [(context, {"pooled_output": None})])
    down, up = torch.randn(4, 256), torch.randn(256, 4)
    server.write_safetensors("loras", "nan_lora.safetensors", {"blocks.0.ffn.2.lora_down.weight": down.clone().fill_(float("nan")),
                                                               "blocks.0.ffn.2.lora_up.weight": up})
    server.write_safetensors("loras", "block_lora.safetensors", {"blocks.0.lora_down.weight": down,
                                                                 "blocks.0.lora_up.weight": up})
    (server.model_dir("loras") / "empty.safetensors").write_bytes(b"")
    (server.model_dir("loras") / "junk.pt").write_bytes(b"not a pickle")

    def with_lora(name):
        graph = sampler_graph(length=13)
        graph["12"] = {"class_type": "SelfForcingLora", "inputs": {"lora_name": name, "strength": 1.0}}
        graph["1"]["inputs"]["loras"] = ["12", 0]
        return graph
    embeddings = sampler_graph(length=13)
    embeddings["2"]["inputs"]["embeddings"] = "nan_prompt.safetensors"
    cases = [(sampler_graph(model="nan_model.safetensors"), "nan_model.safetensors: tensor blocks.1.ffn.2.weight holds NaN"),
             (sampler_graph(decoder="vae_approx/taew2_1_inf.safetensors"), "taew2_1_inf.safetensors: tensor decoder.1.weight holds NaN or Inf"),
             (embeddings, "nan_prompt.safetensors: tensor context.0 holds NaN"),
             (with_lora("nan_lora.safetensors"), "nan_lora.safetensors: tensor blocks.0.ffn.2.lora_down.weight holds NaN"),
             (with_lora("block_lora.safetensors"), "LoRA block_lora.safetensors targets blocks.0, which is not a linear layer"),
             (with_lora("empty.safetensors"), "empty.safetensors is not a readable .safetensors file"),
             (with_lora("junk.pt"), "junk.pt could not be read with torch.load")]
    for graph, message in cases:
        with pytest.raises(PromptExecutionError) as failed:
            server.run(graph, timeout=300)
        assert message in failed.value.details["exception_message"]
        assert failed.value.details["exception_type"].startswith("selfforcing."), failed.value.details["exception_type"]


def test_a_video_far_beyond_any_memory_is_refused_with_the_estimate_before_allocating(server):
    """4096x4096, the longest length, window 21: both samplers refuse at once with the estimate and the
    free memory (the decoded frames alone are ~820 GB, above any machine); small runs pass (above)."""
    longest = server.object_info("SelfForcingStreamingSampler")["input"]["required"]["length"][1]["max"]
    for node in ("SelfForcingStreamingSampler", "SelfForcingKeyframeSampler"):
        graph = sampler_graph(width=4096, height=4096, length=longest, window=21)
        graph["4"]["class_type"] = node
        if node == "SelfForcingKeyframeSampler":
            graph["4"]["inputs"].update(method="guidance", ramp_frames=5, image_fit="crop", end_strength=1.0)
        with pytest.raises(PromptExecutionError) as refused:
            server.run(graph, timeout=300)
        assert refused.value.details["exception_type"] == "selfforcing.MemoryGuardError"
        assert re.search(r"this video needs about \d+\.\d GiB on cpu but only \d+\.\d GiB is free; lower width",
                         refused.value.details["exception_message"])
