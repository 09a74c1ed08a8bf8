"""The training loop: which parameters each update changes, resume, two processes, and efficacy."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from selfforcing_core import dmd
from selfforcing_core.clips import prepare_clips
from selfforcing_core.lora import active_adapter, adapter_parameters
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.rollout import NoiseSource, sample_video
from selfforcing_core.trainer import CHECKPOINT_NAME, ClipBatchSource, Trainer, TrainConfig, loss_curve_image
from test_clips import fake_encoder

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = WanConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, text_dim=32, text_len=16)


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
    before = snapshot(trainer.model)
    loss = getattr(trainer, step)(torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(loss))
    own = {name for name, _ in trainer.model.named_parameters() if name.endswith(f".{adapter}")}
    assert own and changed(trainer.model, before) == own
    if adapter == dmd.GENERATOR:
        assert trainer.ema is not None and set(trainer.ema) == set(adapter_parameters(trainer.model, adapter))


def test_resume_from_an_interrupt_reproduces_an_uninterrupted_run(tmp_path):
    straight = Trainer(tiny_model(), tiny_data(), small_config())
    straight.run()

    def interrupt_after_four(record):
        if record["step"] == 3:
            raise KeyboardInterrupt
    first = Trainer(tiny_model(), tiny_data(), small_config())
    with pytest.raises(KeyboardInterrupt):
        first.run(checkpoint_dir=tmp_path, between_steps=interrupt_after_four)
    resumed = Trainer(tiny_model(), tiny_data(), small_config())
    assert resumed.resume(tmp_path) and resumed.step == 4
    resumed.run(checkpoint_dir=tmp_path)
    for name, p in straight.model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name
    assert straight.ema.keys() == resumed.ema.keys()
    assert all(torch.equal(straight.ema[k], resumed.ema[k]) for k in straight.ema)
    assert straight.history == resumed.history
    with pytest.raises(ValueError, match="different options"):
        Trainer(tiny_model(), tiny_data(), small_config(lora_rank=8)).resume(tmp_path)


def write_run_folder(folder: Path, nproc: int) -> Path:
    """A tiny model file, a prepared clip dataset and a CLI config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_model().state_dict(), folder / "model.safetensors")
    clips = folder / "clips"
    for c in range(3):
        (clips / f"clip{c}").mkdir(parents=True)
        for i in range(9):
            Image.new("RGB", (32, 32), (20 * i + c, 100, 200 - 10 * i)).save(clips / f"clip{c}" / f"{i:02}.png")
    g = torch.Generator().manual_seed(0)
    prepare_clips(clips, folder / "cache", fake_encoder([]), width=32, height=32, latent_frames=3,
                  negative=torch.randn(4, 32, generator=g), prompt=torch.randn(6, 32, generator=g))
    config = {"model": str(folder / "model.safetensors"), "dataset": str(folder / "cache"),
              "output": str(folder / "out"), "num_heads": 2, "text_len": 16,
              "training": {"steps": 3, "batch_size": 4, "lora_rank": 4, "generator_lr": 1e-3, "critic_lr": 1e-3,
                           "real_lr": 1e-3, "dfake_gen_update_ratio": 2, "ema_start_step": 0}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def run_cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    single = write_run_folder(tmp_path / "single", 1)
    double = write_run_folder(tmp_path / "double", 2)
    out = run_cli([sys.executable, "-m", "selfforcing_core.train", str(single)], tmp_path)
    assert "step 3/3" in out and "saved" in out
    run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "selfforcing_core.train", str(double)], tmp_path)
    one = torch.load(tmp_path / "single" / "out" / CHECKPOINT_NAME, weights_only=True)
    two = torch.load(tmp_path / "double" / "out" / CHECKPOINT_NAME, weights_only=True)
    assert one["step"] == two["step"] == 3
    for adapter, params in one["adapters"].items():
        for key, value in params.items():
            torch.testing.assert_close(two["adapters"][adapter][key], value, atol=1e-5, rtol=1e-4)
    for a, b in zip(one["history"], two["history"]):
        for name in ("generator", "critic", "real"):
            assert (a[name] is None) == (b[name] is None)
            if a[name] is not None:
                assert abs(a[name] - b[name]) <= 1e-5 * max(1.0, abs(a[name]))
    assert (tmp_path / "single" / "out" / "lora.safetensors").is_file()


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
        start = rollout_channel_means(trainer.model, data.prompts[0])
        curve = [float(start.mean())]
        for steps in range(100, 301, 100):
            trainer.run(steps)
            curve.append(float(rollout_channel_means(trainer.model, data.prompts[0]).mean()))
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
    assert all("forward" not in block.__dict__ for block in model.blocks)
    assert image.shape == (360, 640, 3) and image.min() < 0.5 < image.max()
