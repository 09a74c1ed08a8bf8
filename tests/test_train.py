"""The training loop: which parameters each update changes, resume, two processes, and efficacy."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfforcing_core import dmd
from selfforcing_core.checkpoint import load_generator
from selfforcing_core import train
from selfforcing_core.clips import ClipBatchSource, load_clips, read_frames
from selfforcing_core.images import resize_to
from selfforcing_core.codec_loading import load_codec
from selfforcing_core.prompt_embeddings import load_prompt_embeddings, save_prompt_embeddings
from selfforcing_core.lora import active_adapter, adapter_parameters
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import NoiseSource, sample_video
from selfforcing_core.loss_curves import format_losses, loss_curve_image
from selfforcing_core.trainer import CHECKPOINT_NAME, Trainer, TrainConfig
from support.decoder_weights import taehv_state_dict, wan_vae_state_dict
from support.files import write_gif
from support.tiny import TINY

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CausalWanModel(TINY)


def tiny_data(windows=4, frames=6, shift=0.0):
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(windows, frames, 16, 4, 4, generator=g)
    latents[:, :, 0] += shift
    return ClipBatchSource(latents=latents, prompts=[torch.randn(5, 32, generator=g) for _ in range(windows)],
                           negative=torch.randn(7, 32, generator=g))


def small_config(**overrides):
    values = dict(steps=7, batch_size=2, lora_rank=4, generator_lr=1e-3, critic_lr=1e-3, real_lr=1e-3,
                  dfake_gen_update_ratio=3, ema_start_step=2, save_every=100)
    values.update(overrides)
    return TrainConfig(**values)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(model, before):
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


@pytest.mark.parametrize("step, adapter", [("generator_step", dmd.GENERATOR), ("critic_step", dmd.FAKE),
                                           ("real_step", dmd.REAL)])
def test_each_update_changes_exactly_its_own_adapter(step, adapter):
    trainer = Trainer(tiny_model(), tiny_data(), small_config(ema_start_step=0))
    before = snapshot(trainer.generator)
    loss = getattr(trainer, step)(torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(loss))
    own = {name for name, _ in trainer.generator.named_parameters() if name.endswith(f".{adapter}")}
    assert own and changed(trainer.generator, before) == own
    if adapter == dmd.GENERATOR:
        assert trainer.ema is not None and set(trainer.ema) == set(adapter_parameters(trainer.generator, adapter))


def test_full_finetune_trains_the_generator_weights_while_critic_and_teacher_keep_the_base(tmp_path):
    base = snapshot(tiny_model())
    trainer = Trainer(tiny_model(), tiny_data(), small_config(finetune="full", ema_start_step=0))
    trainer.generator_step(torch.Generator().manual_seed(0))
    assert changed(trainer.generator, base) == set(base)  # every weight of the generator trains
    scores_before = snapshot(trainer.scores)
    scores_base = {name.replace(".base.", "."): p for name, p in scores_before.items() if name in base or ".base." in name}
    assert scores_base.keys() == base.keys() and all(torch.equal(scores_base[k], v) for k, v in base.items())
    trainer.critic_step(torch.Generator().manual_seed(1))
    assert changed(trainer.scores, scores_before) == {n for n in scores_before if n.endswith(f".{dmd.FAKE}")}
    trainer.save_generator(tmp_path / "full.safetensors")
    loaded = load_generator(tmp_path / "full.safetensors", num_heads=2, text_len=16)
    assert loaded.state_dict().keys() == trainer.ema.keys()
    assert all(torch.equal(v, trainer.ema[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="FP8"):
        Trainer(load_generator(tiny_model().state_dict(), num_heads=2, text_len=16, fp8="e4m3fn"), tiny_data(),
                small_config(finetune="full"))


def test_training_keeps_fp32_master_weights_on_a_bf16_cpu(tmp_path, monkeypatch):
    """dtype auto picks bf16 for inference on a CPU with bf16 matrix units, but a training run loads
    fp32; LoRA adapters on an explicitly bf16 base are fp32 and train; full fine-tuning of 16-bit
    weights is refused."""
    monkeypatch.setenv("SELFFORCING_CPU_BF16", "1")
    save_file(tiny_model().state_dict(), tmp_path / "model.safetensors")
    config = {"model": str(tmp_path / "model.safetensors"), "num_heads": 2, "text_len": 16}
    assert load_generator(config["model"], num_heads=2, text_len=16).dtype == torch.bfloat16  # inference
    assert train.load_for_training({**config, "dtype": "auto"}, "cpu").dtype == torch.float32
    assert train.load_for_training(config, "cpu").dtype == torch.float32
    bf16_base = train.load_for_training({**config, "dtype": "bf16"}, "cpu")
    assert bf16_base.dtype == torch.bfloat16
    trainer = Trainer(bf16_base, tiny_data(), small_config())
    before = {name: {key: p.detach().clone() for key, p in params.items()} for name, params in trainer.params.items()}
    trainer.train_step()
    for name, params in trainer.params.items():
        assert all(p.dtype == torch.float32 for p in params.values()), name
        assert any(not torch.equal(p, before[name][key]) for key, p in params.items()), name
    with pytest.raises(ValueError, match="fp32 master copy.*torch.bfloat16"):
        Trainer(train.load_for_training({**config, "dtype": "bf16"}, "cpu"), tiny_data(), small_config(finetune="full"))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_from_an_interrupt_reproduces_an_uninterrupted_run(tmp_path, finetune):
    straight = Trainer(tiny_model(), tiny_data(), small_config(finetune=finetune))
    straight.run()

    def interrupt_after_four(record):
        if record["step"] == 3:
            raise KeyboardInterrupt
    first = Trainer(tiny_model(), tiny_data(), small_config(finetune=finetune))
    with pytest.raises(KeyboardInterrupt):
        first.run(checkpoint_dir=tmp_path, between_steps=interrupt_after_four)
    resumed = Trainer(tiny_model(), tiny_data(), small_config(finetune=finetune))
    assert resumed.resume(tmp_path) and resumed.step == 4
    resumed.run(checkpoint_dir=tmp_path)
    for network in ("generator", "scores"):
        ours = dict(getattr(resumed, network).named_parameters())
        for name, p in getattr(straight, network).named_parameters():
            assert torch.equal(p, ours[name]), name
    assert straight.ema.keys() == resumed.ema.keys()
    assert all(torch.equal(straight.ema[k], resumed.ema[k]) for k in straight.ema)
    assert straight.history == resumed.history
    with pytest.raises(ValueError, match="different options"):
        Trainer(tiny_model(), tiny_data(), small_config(finetune=finetune, lora_rank=8)).resume(tmp_path)


def write_clip_folder(folder: Path) -> Path:
    """Three tiny gif clips of 9 frames (one 3-latent-frame window each)."""
    folder.mkdir(parents=True)
    for c in range(3):
        write_gif(folder / f"clip{c}.gif")
    return folder


def write_run_folder(folder: Path, finetune: str) -> Path:
    """A tiny model file, a clip dataset prepared by the CLI's prepare command (tiny TAEHV) and a CLI config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_model().state_dict(), folder / "model.safetensors")
    save_file(taehv_state_dict(), folder / "taew2_1.safetensors")
    g = torch.Generator().manual_seed(0)
    for name, length in (("prompt", 6), ("negative", 4)):
        save_prompt_embeddings(folder / f"{name}.safetensors", [(torch.randn(1, length, 32, generator=g), {})])
    train.main(["prepare", str(write_clip_folder(folder / "clips")), str(folder / "cache"), "--encoder",
                str(folder / "taew2_1.safetensors"), "--prompt", str(folder / "prompt.safetensors"),
                "--negative", str(folder / "negative.safetensors"), "--width", "32", "--height", "32",
                "--latent-frames", "3"])
    config = {"model": str(folder / "model.safetensors"), "dataset": str(folder / "cache"),
              "output": str(folder / "out"), "num_heads": 2, "text_len": 16,
              "training": {"steps": 3, "batch_size": 4, "lora_rank": 4, "generator_lr": 1e-3, "critic_lr": 1e-3,
                           "real_lr": 1e-3, "dfake_gen_update_ratio": 2, "ema_start_step": 0, "finetune": finetune}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def test_prepare_command_encodes_clips_with_either_encoder_file(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    save_prompt_embeddings(tmp_path / "prompt.safetensors", [(torch.randn(1, 6, 32, generator=g), {})])
    save_prompt_embeddings(tmp_path / "negative.safetensors", [(torch.randn(1, 4, 32, generator=g), {})])
    clips = write_clip_folder(tmp_path / "clips")
    (clips / "broken.mp4").write_bytes(b"nothing")
    pixels = torch.stack([resize_to(read_frames(clips / f"clip{c}.gif"), 32, 32) for c in range(3)])
    for name, weights in (("taew2_1.safetensors", taehv_state_dict()), ("wan_2.1_vae.safetensors", wan_vae_state_dict())):
        save_file(weights, tmp_path / name)
        train.main(["prepare", str(clips), str(tmp_path / f"cache-{name}"), "--encoder", str(tmp_path / name),
                    "--prompt", str(tmp_path / "prompt.safetensors"), "--negative",
                    str(tmp_path / "negative.safetensors"), "--width", "32", "--height", "32", "--latent-frames", "3"])
        assert "prepared 3 windows of 3 latent frames" in capsys.readouterr().out
        data = load_clips(tmp_path / f"cache-{name}")
        with torch.no_grad():
            expected = load_codec(weights, latent_space="normalised").encode_video(pixels)
        assert data.names == ["clip0.gif#0", "clip1.gif#0", "clip2.gif#0"] and data.latents.shape == (3, 3, 16, 4, 4)
        torch.testing.assert_close(data.latents, expected)
        assert torch.equal(data.prompts[0], load_prompt_embeddings(tmp_path / "prompt.safetensors")[0][0][0])
        assert torch.equal(data.negative, load_prompt_embeddings(tmp_path / "negative.safetensors")[0][0][0])


def run_cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# One process and two differ only in float32 rounding: the batch halves and the all-reduce sum the
# gradients in another order (relative error ~ float32 epsilon). AdamW divides each gradient by its own
# running magnitude, so an element changes by up to its whole update only where its gradient is itself
# at rounding level, a fraction ~ eps of the elements; the difference of the two runs' parameters is then
# at most ~ sqrt(eps) of the update's norm (2 * sqrt(eps) = 6.9e-4). A wrong all-reduce (sum instead of
# mean) moves every element: measured 8e-3 .. 4e-2 of the update, against 1e-5 for the correct one.
FLOAT32_UPDATE_SPREAD = 2 * torch.finfo(torch.float32).eps ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, finetune):
    """LoRA: adapter gradients all-reduced; full: the generator sharded by FSDP over gloo. The two-process
    run stops after 2 steps and resumes for the third (gathered checkpoint, re-sharded optimizer state)."""
    single = write_run_folder(tmp_path / "single", finetune)
    double = write_run_folder(tmp_path / "double", finetune)
    out = run_cli([sys.executable, "-m", "selfforcing_core.train", str(single)], tmp_path)
    assert "step 3/3" in out and "saved" in out
    config = json.loads(double.read_text())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "selfforcing_core.train", str(double)]
    for steps in (2, 3):
        config["training"]["steps"] = steps
        double.write_text(json.dumps(config))
        out = run_cli(torchrun, tmp_path)
    assert "resumed" in out and ("FSDP" in out) == (finetune == "full")
    one = torch.load(tmp_path / "single" / "out" / CHECKPOINT_NAME, weights_only=True)
    two = torch.load(tmp_path / "double" / "out" / CHECKPOINT_NAME, weights_only=True)
    assert one["step"] == two["step"] == 3
    options = json.loads(single.read_text())
    start = Trainer(load_generator(options["model"], num_heads=2, text_len=16), load_clips(options["dataset"]),
                    TrainConfig.from_dict(options["training"])).params  # the parameters before step 1
    for network, params in one["parameters"].items():
        update = torch.cat([(value - start[network][key].detach()).flatten() for key, value in params.items()])
        spread = torch.cat([(two["parameters"][network][key] - value).flatten() for key, value in params.items()])
        assert spread.norm() <= FLOAT32_UPDATE_SPREAD * update.norm(), (network, float(spread.norm() / update.norm()))
    for a, b in zip(one["history"], two["history"], strict=True):
        for name in ("generator", "critic", "real"):
            assert (a[name] is None) == (b[name] is None)
            if a[name] is not None:
                assert abs(a[name] - b[name]) <= FLOAT32_UPDATE_SPREAD * abs(a[name])
    result = "generator.safetensors" if finetune == "full" else "lora.safetensors"
    saved_one, saved_two = (load_file(tmp_path / run / "out" / result) for run in ("single", "double"))
    assert saved_one.keys() == saved_two.keys()
    for key, value in saved_one.items():
        assert (saved_two[key] - value).norm() <= FLOAT32_UPDATE_SPREAD * value.norm(), key
    if finetune == "full":
        load_generator(tmp_path / "double" / "out" / result, num_heads=2, text_len=16)


def rollout_channel_means(model, prompt, samples=16):
    """Per-sample mean of latent channel 0 over the generator's full 4-step rollouts (fixed noise). -> [samples]."""
    with torch.no_grad(), active_adapter(model, dmd.GENERATOR):
        video = sample_video(model, prompt[None].expand(samples, -1, -1), 2, (16, 4, 4),
                             noise=NoiseSource(generator=torch.Generator().manual_seed(123)), batch_size=samples)
    return video[:, :, 0].mean(dim=(1, 2, 3))


@pytest.mark.slow
def test_training_moves_the_generator_toward_the_clips():
    """Clips whose channel 0 is shifted by +2 (which the teacher = initial generator does not produce):
    300 steps must move the rollouts' channel-0 mean far toward +2, while the same run with the clip
    adapter switched off (plain distillation of the teacher) must stay where it was."""
    data = tiny_data(windows=32, shift=2.0)
    data.prompts = [data.prompts[0]] * 32
    target = float(data.latents[:, :, 0].mean())

    def train(real_lora_weight):
        trainer = Trainer(tiny_model(), data, small_config(steps=300, dfake_gen_update_ratio=5, ema_start_step=10 ** 9,
                                                           lora_rank=8, real_lora_weight=real_lora_weight,
                                                           gradient_checkpointing=False))
        start = rollout_channel_means(trainer.generator, data.prompts[0])
        curve = [float(start.mean())]
        for steps in range(100, 301, 100):
            trainer.run(steps)
            curve.append(float(rollout_channel_means(trainer.generator, data.prompts[0]).mean()))
        return start, curve
    start, curve = train(1.0)
    _, control = train(0.0)
    print(f"channel-0 mean at steps 0/100/200/300: clips {curve}, plain distillation {control}, target {target:.3f}")
    noise = float(start.std() / len(start) ** 0.5)  # standard error of the statistic from the sampling noise
    moved, drift = curve[-1] - curve[0], abs(control[-1] - control[0])
    assert moved > 0.5 * (target - curve[0])  # more than half-way to the clips' mean
    assert moved > 10 * max(noise, drift)


def test_close_gives_the_model_back_unchanged_and_the_loss_image_is_drawn():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():  # as a host that loads models under inference mode
        data = tiny_data()
    trainer = Trainer(model, data, small_config(steps=2))
    trainer.run()
    image = loss_curve_image(trainer.history)
    trainer.close()
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not block.forward_wrappers for block in model.blocks)
    assert image.shape == (360, 640, 3) and image.min() < 0.5 < image.max()


def test_format_losses_gives_the_latest_value_of_each_loss():
    history = [{"step": 0, "generator": 1.0, "critic": 2.0, "real": None},
               {"step": 1, "generator": None, "critic": 0.123456, "real": 3.0}]
    assert format_losses(history) == "generator 1, critic 0.1235, real 3"
    assert format_losses(history[1:]) == "critic 0.1235, real 3"
