"""The training-clips and trainer nodes end to end in a real ComfyUI server (POST /prompt)."""
import pytest
import torch

from support.comfy_host import (ComfyServer, PromptExecutionError, PromptValidationError, find_host_or_skip,
                                run_watching, write_tiny_generator, write_tiny_prompts)
from support.decoder_weights import taehv_state_dict
from support.files import write_gif
from support.tiny import HOST_TINY
from selfforcing_core.lora_files import read_lora
from selfforcing_core.loss_curves import format_losses
from selfforcing_core.model import CausalWanModel

pytestmark = pytest.mark.host

@pytest.fixture(scope="module")
def server(comfy_server, tmp_path_factory):
    """The session server with a tiny generator, TAEHV, two prompt embeddings and a clip folder."""
    write_tiny_generator(comfy_server, "sf_train_tiny.safetensors", prefix="")
    comfy_server.write_safetensors("vae_approx", "taew2_1.safetensors", taehv_state_dict())
    write_tiny_prompts(comfy_server, ("train_prompt", "train_negative"))
    clips = comfy_server.base_dir / "input" / "train_clips"
    clips.mkdir(parents=True, exist_ok=True)
    for c in range(2):
        write_gif(clips / f"clip{c}.gif")
    (clips / "broken.mp4").write_bytes(b"nothing")
    return comfy_server


def trainer_graph(server, lora_name, steps, save_every=2, resume=True):
    return {
        "1": {"class_type": "SelfForcingModelLoader",
              "inputs": {"model_name": "sf_train_tiny.safetensors", "weight_dtype": "fp32", "device": "default"}},
        "2": {"class_type": "SelfForcingDecoderLoader",
              "inputs": {"decoder_name": "vae_approx/taew2_1.safetensors", "dtype": "fp32"}},
        "3": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "train_prompt.safetensors"}},
        "4": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "train_negative.safetensors"}},
        "5": {"class_type": "SelfForcingTrainingClips",
              "inputs": {"folder": "train_clips", "encoder": ["2", 0], "prompt": ["3", 0],
                         "negative": ["4", 0], "width": 32, "height": 32, "length": 9}},
        "6": {"class_type": "SelfForcingTrainer",
              "inputs": {"model": ["1", 0], "training_videos": ["5", 0], "lora_name": lora_name, "steps": steps,
                         "generator_lr": 1e-3, "critic_lr": 1e-3, "lora_rank": 4, "real_lora_weight": 1.0,
                         "batch_size": 1, "seed": 0, "save_every": save_every, "resume": resume}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
    }


def read_checkpoint(server, lora_name):
    return torch.load(server.output_dir / "self_forcing_training" / lora_name / "checkpoint.pt", weights_only=True)


def test_trainer_node_trains_saves_a_loadable_lora_and_a_checkpoint(server):
    graph = trainer_graph(server, "e2e_lora", steps=3)
    outcome, progress, previews, prompt_id = run_watching(server, graph, "6")
    assert outcome == "execution_success"
    assert progress == [(1, 3), (2, 3), (3, 3)] and previews == 1  # the loss curves after the last step
    saved = server.wait(prompt_id)["outputs"]["6"]
    adapters = read_lora(server.model_dir("loras") / "e2e_lora_00001_.safetensors")
    assert len(adapters) == HOST_TINY.num_layers * 10
    checkpoint = read_checkpoint(server, "e2e_lora")
    assert checkpoint["step"] == 3 and len(checkpoint["history"]) == 3
    assert "broken.mp4" in server.log()
    text = saved["text"]
    assert "saved loras/e2e_lora_00001_.safetensors" in text[0]
    assert f"last losses: {format_losses(checkpoint['history'])}" in text[0]
    assert "step 3/3: critic" in server.log()  # every step's losses in the log
    # the trained LoRA loads through the pack's LoRA and model-loader nodes and samples
    server.wait(server.queue_prompt({
        "1": {"class_type": "SelfForcingLora", "inputs": {"lora_name": "e2e_lora_00001_.safetensors", "strength": 1.0}},
        "2": {"class_type": "SelfForcingModelLoader",
              "inputs": {"model_name": "sf_train_tiny.safetensors", "weight_dtype": "fp32", "device": "default",
                         "loras": ["1", 0]}},
        "3": graph["3"],
        "4": {"class_type": "SelfForcingStreamingSampler",
              "inputs": {"model": ["2", 0], "positive": ["3", 0], "width": 32, "height": 32, "length": 9, "seed": 1,
                         "steps": "4 steps, shift 5 (paper)", "kv_window_frames": 0, "sink_frames": 0}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }))


def test_interrupt_saves_a_checkpoint_that_the_next_run_resumes_to_the_end(server):
    """POST /interrupt mid-run: the run ends interrupted with a checkpoint of the finished steps;
    queued again with resume on, it continues from there (not from 0) to the requested step count."""
    def interrupt_after_six_steps(value):
        if value == 6:
            server.interrupt()
    long_run = trainer_graph(server, "e2e_interrupt", steps=5000, save_every=5000)
    outcome, progress, previews, _ = run_watching(server, long_run, "6", on_progress=interrupt_after_six_steps)
    assert outcome == "execution_interrupted" and previews >= 1  # a loss-curve preview at step 5
    assert not list(server.model_dir("loras").glob("e2e_interrupt*"))  # no LoRA from a cut run
    interrupted = read_checkpoint(server, "e2e_interrupt")
    done = interrupted["step"]
    assert 6 <= done < 5000 and len(interrupted["history"]) == done
    assert done >= progress[-1][0]  # the checkpoint holds every step the progress bar showed
    outcome, progress, _, _ = run_watching(server, trainer_graph(server, "e2e_interrupt", steps=done + 3), "6")
    assert outcome == "execution_success"
    assert [value for value, _ in progress] == [done + 1, done + 2, done + 3]  # resumed, not restarted
    finished = read_checkpoint(server, "e2e_interrupt")
    assert finished["step"] == done + 3 and len(finished["history"]) == done + 3
    assert finished["history"][:done] == interrupted["history"]
    assert (server.model_dir("loras") / "e2e_interrupt_00001_.safetensors").is_file()


def test_training_length_that_is_not_whole_blocks_is_refused_before_running(server):
    graph = trainer_graph(server, "never_trained", steps=1)
    clips_node = next(node for node in graph.values() if node["class_type"] == "SelfForcingTrainingClips")
    clips_node["inputs"]["length"] = 13
    with pytest.raises(PromptValidationError, match="not whole blocks of 3; use one of 9, 21"):
        server.queue_prompt(graph)


def test_lora_names_that_leave_the_loras_folder_are_refused_and_nothing_is_written(server):
    """'../diffusion_models/x', an absolute path or an empty name: refused at POST /prompt; the
    model file the name aims at is untouched and no run folder appears outside ComfyUI."""
    target = server.model_dir("diffusion_models") / "sf_train_tiny.safetensors"
    before = target.read_bytes()
    outside = server.base_dir / "outside_run"
    for name, message in (("../diffusion_models/sf_train_tiny", "points outside its ComfyUI folder"),
                          (str(outside / "x"), "points outside its ComfyUI folder"),
                          ("", "names no file")):
        with pytest.raises(PromptValidationError, match=message):
            server.queue_prompt(trainer_graph(server, name, steps=1))
    assert target.read_bytes() == before and not outside.exists()


def test_a_finished_run_never_replaces_an_existing_lora_and_resume_off_never_destroys_a_checkpoint(server):
    """A LoRA already in models/loras under the run's name stays as it was (the run saves the next
    counter, as ComfyUI's save nodes do); resume off is refused while the run folder holds a checkpoint."""
    existing = server.model_dir("loras") / "kept_00001_.safetensors"
    existing.write_bytes(b"a user's file")
    outcome, _, _, prompt_id = run_watching(server, trainer_graph(server, "kept", steps=1), "6")
    assert outcome == "execution_success" and existing.read_bytes() == b"a user's file"
    assert server.wait(prompt_id)["outputs"]["6"]["text"][0].startswith(
        "saved loras/kept_00002_.safetensors")
    checkpoint = read_checkpoint(server, "kept")
    with pytest.raises(PromptValidationError, match="already has a run with a checkpoint; turn resume on"):
        server.queue_prompt(trainer_graph(server, "kept", steps=1, resume=False))
    assert read_checkpoint(server, "kept")["history"] == checkpoint["history"]


def test_clip_folders_outside_the_input_folder_are_refused_without_saying_whether_they_exist(server):
    """An existing folder outside (absolute or ../), and a missing one, get the same refusal."""
    graph = trainer_graph(server, "never_trained", steps=1)
    messages = []
    for folder in (str(server.base_dir / "models"), "../models", "/no/such/folder", "no_such_clips"):
        graph["5"]["inputs"]["folder"] = folder
        with pytest.raises(PromptValidationError) as refused:
            server.queue_prompt(graph)
        messages.append(str(refused.value).replace(folder, "<folder>"))
    assert "is not a clip folder inside ComfyUI's input folder" in messages[0]
    assert len(set(messages)) == 1


def test_the_encoded_clip_cache_is_not_served_over_http(server):
    """The cache of encoded clips lives in the host's system-user folder, which no endpoint serves."""
    run_watching(server, trainer_graph(server, "cache_check", steps=1), "6")
    assert not (server.output_dir / "self_forcing_training" / "clips").exists()
    cached = list((server.base_dir / "user" / "__self_forcing_clip_cache").rglob("*.safetensors"))
    assert cached


def test_clip_encoding_far_beyond_any_memory_is_refused_with_the_estimate(server):
    graph = trainer_graph(server, "never_trained", steps=1)
    graph["5"]["inputs"].update(width=2048, height=2048, length=1017)
    with pytest.raises(PromptExecutionError, match=r"encoding 1017 frames at 2048x2048 needs about \d+\.\d GiB on "
                                                   r"cpu but only \d+\.\d GiB is free"):
        server.run(graph, timeout=300)


def test_an_owner_widens_the_readable_clip_folders_with_extra_model_paths(comfy_server, tmp_path):
    """A selfforcing_clips entry in extra_model_paths.yaml makes its subfolders usable by name; a
    sibling folder outside it stays refused."""
    datasets = tmp_path / "datasets"
    (datasets / "walks").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    for c in range(2):
        write_gif(datasets / "walks" / f"walk{c}.gif")
        write_gif(tmp_path / "private" / f"secret{c}.gif")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"self_forcing:\n    base_path: {tmp_path}\n    selfforcing_clips: datasets/\n")
    owner = ComfyServer(find_host_or_skip(), extra_args=["--extra-model-paths-config", str(config)]).start()
    try:
        owner.write_safetensors("vae_approx", "taew2_1.safetensors", taehv_state_dict())
        write_tiny_prompts(owner, ("train_prompt", "train_negative"))
        graph = {key: node for key, node in trainer_graph(owner, "unused", steps=1).items() if key in ("2", "3", "4", "5")}
        graph["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
        graph["5"]["inputs"]["folder"] = "walks"
        owner.run(graph, timeout=300)
        for folder in ("../private", str(tmp_path / "private")):
            graph["5"]["inputs"]["folder"] = folder
            with pytest.raises(PromptValidationError, match="1 selfforcing_clips folder"):
                owner.queue_prompt(graph)
    finally:
        owner.stop()


@pytest.fixture
def pack_in_process(comfy_api_import, tmp_path, monkeypatch):
    """The pack imported in this process as the host imports it (a package beside the host's
    modules), with the host's output and loras folders in ``tmp_path``. No server runs: the live
    routes register on a stand-in PromptServer."""
    import importlib.util
    import sys
    import types

    import folder_paths
    from aiohttp import web

    from support.comfy_paths import REPO_ROOT
    stand_in = types.ModuleType("server")
    stand_in.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(routes=web.RouteTableDef()))
    monkeypatch.setitem(sys.modules, "server", sys.modules.get("server", stand_in))
    if "selfforcing_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("selfforcing_pack", REPO_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT)])
        package = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "selfforcing_pack", package)
        spec.loader.exec_module(package)
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path / "loras")], {".safetensors"}))
    return importlib.import_module("selfforcing_pack.nodes.trainer"), tmp_path


def test_trainer_refuses_a_run_beyond_any_memory_before_touching_the_model(pack_in_process):
    """Clip windows of 255 latent frames at 4096x4096, batch 64: about 4 TB of KV cache alone.
    Refused with the estimate and the fix before the trainer wraps the model or writes a file."""
    trainer, root = pack_in_process
    from selfforcing_pack.selfforcing_core.clips import ClipBatchSource
    torch.manual_seed(0)
    model = CausalWanModel(HOST_TINY).eval().requires_grad_(False)  # as the loader gives it
    before = {name: p.clone() for name, p in model.state_dict().items()}
    clips = ClipBatchSource(latents=torch.zeros(()).expand(1, 255, 16, 512, 512),  # no memory behind it
                            prompts=[torch.zeros(4, HOST_TINY.text_dim)], negative=torch.zeros(4, HOST_TINY.text_dim))
    with pytest.raises(ValueError, match=r"training on 64 x 255 latent frames at 4096x4096 needs about \d+\.\d GiB on "
                                         r"cpu but only .* is free; lower the batch size") as refusal:
        trainer.SelfForcingTrainer.execute(model, clips, "too_big", steps=1, generator_lr=1e-4, critic_lr=1e-4,
                                           lora_rank=4, real_lora_weight=1.0, batch_size=64, seed=0, save_every=1,
                                           resume=False)
    assert type(refusal.value).__name__ == "MemoryGuardError" and refusal.value.need > 2 ** 40
    assert [type(m).__name__ for m in model.modules()].count("LoRALinear") == 0  # no adapter was injected
    assert all(p.equal(before[name]) and not p.requires_grad for name, p in model.state_dict(keep_vars=True).items())
    assert not [path for path in root.rglob("*") if path.is_file()]  # no run folder, checkpoint or LoRA
