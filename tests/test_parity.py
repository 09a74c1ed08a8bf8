"""The parity command reads everything from the fixture files: a fixture root of the same format
with other sizes, head counts, windows, sinks, batch and prefill is reproduced too."""
import json

import torch
from safetensors.torch import save_file

from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.parity import run_parity
from selfforcing_core.rollout import NoiseSource, StreamSettings, sample_video
from selfforcing_core.schedule import FlowMatchSchedule
from support.files import write_model_root
from support.tiny import OTHER_TINY


def write_fixture_root(root, cfg: WanConfig, case: dict, latent_hw, batch: int, prefill_frames: int):
    """A fixture root in the official format whose expected outputs come from an independent
    float64 run of the same rollout (so the float32 parity run must get within tolerance)."""
    model = write_model_root(root, cfg)
    folder = root / "case"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(case))
    g = torch.Generator().manual_seed(1)
    frames = 3 * case["num_blocks"]
    schedule = FlowMatchSchedule(case["timestep_shift"])
    inputs = {"noise": torch.randn(batch, frames, cfg.in_dim, *latent_hw, generator=g),
              "prompt_embeds": torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g),
              "renoise": torch.randn(case["num_blocks"], 3, batch, 3, cfg.in_dim, *latent_hw, generator=g),
              "denoising_step_list": schedule.warp()}
    if prefill_frames:
        inputs["initial_latent"] = torch.randn(batch, prefill_frames, cfg.in_dim, *latent_hw, generator=g)
    save_file(inputs, str(folder / "inputs.safetensors"))
    window = case["local_attn_size"]
    expected = sample_video(model.double(), inputs["prompt_embeds"].double(), case["num_blocks"],
                            (cfg.in_dim, *latent_hw),
                            noise=NoiseSource(initial=inputs["noise"].double(), renoise=inputs["renoise"].double()),
                            batch_size=batch,
                            settings=StreamSettings(kv_window_frames=None if window == -1 else window,
                                                    sink_frames=case["sink_size"], shift=schedule.shift,
                                                    timesteps=inputs["denoising_step_list"],
                                                    prefill=inputs["initial_latent"].double() if prefill_frames
                                                    else None))
    save_file({"final_latents": expected.float()}, str(folder / "outputs.safetensors"))


def test_parity_reproduces_a_fixture_root_with_other_shapes(tmp_path):
    case = {"num_blocks": 3, "local_attn_size": 5, "sink_size": 2, "num_frame_per_block": 3,
            "timestep_shift": 8.0, "context_noise": 0}
    write_fixture_root(tmp_path / "other", OTHER_TINY, case, latent_hw=(6, 4), batch=2, prefill_frames=3)
    comparisons = run_parity(tmp_path / "other")
    assert [c.tensor for c in comparisons] == ["final_latents"]
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons]
    assert comparisons[0].max_abs_error < 1e-4


def test_parity_reproduces_decoder_fixture_roots_with_other_widths_and_shapes(tmp_path):
    """TAEHV and Wan VAE fixture roots at other widths, frame counts and sizes, with expected
    tensors from a float64 run: the parity command must rebuild everything from the files."""
    from support.decoder_weights import taehv_state_dict, wan_vae_state_dict
    from selfforcing_core.codec_loading import load_codec
    from selfforcing_core.latents import normalised_to_raw, raw_to_normalised

    g = torch.Generator().manual_seed(3)
    taehv_root, wan_root = tmp_path / "taehv", tmp_path / "wanvae"
    for root, weights, architecture in ((taehv_root, taehv_state_dict((24, 16, 8, 8), 8, seed=5), "official TAEHV"),
                                        (wan_root, wan_vae_state_dict(dim=4, seed=6), "official WanVAE_ (narrowed)")):
        root.mkdir()
        save_file(weights, str(root / "weights.safetensors"))
        (root / "config.json").write_text(json.dumps({"architecture": architecture}))
    with torch.no_grad():
        taehv = load_codec(taehv_state_dict((24, 16, 8, 8), 8, seed=5)).double()
        latents, video = torch.randn(2, 5, 16, 6, 4, generator=g), torch.rand(2, 12, 3, 24, 40, generator=g)
        save_file({"latents": latents, "video": video}, str(taehv_root / "inputs.safetensors"))
        save_file({"decoder_raw": taehv.decode_raw(latents.double()).float(),
                   "decoded": taehv.decode_video(latents.double()).float(),
                   "encoded": taehv.encode_video(video.double()).float()}, str(taehv_root / "outputs.safetensors"))

        wan = load_codec(wan_vae_state_dict(dim=4, seed=6)).double()
        video, latents = torch.rand(1, 3, 5, 32, 48, generator=g) * 2 - 1, torch.randn(1, 16, 3, 4, 6, generator=g)
        raw = normalised_to_raw(latents, channel_dim=1)
        mu = wan.encode_mean(video.double(), {})
        decoded = wan.decode_raw(raw.double(), {})
        save_file({"video": video, "latents": latents, "latents_raw": raw}, str(wan_root / "inputs.safetensors"))
        save_file({"encoder_out": wan.encoder(video.double(), {}).float(), "encode_mu": mu.float(),
                   "encode_latents": raw_to_normalised(mu, channel_dim=1).float(), "decode_raw": decoded.float(),
                   "decode_chunked": decoded.clamp(-1, 1).float()}, str(wan_root / "outputs.safetensors"))
    for root in (taehv_root, wan_root):
        comparisons = run_parity(root)
        assert len(comparisons) >= 4 and all(c.passed for c in comparisons), [c.line() for c in comparisons]


def write_flat_case(folder, model: CausalWanModel, case: dict, plan: list[int], steps: list[int], latent_hw,
                    batch: int, prefill_frames: int, schedule: FlowMatchSchedule):
    """A case in the flat-draw format of fixtures/selfforcing_framewise and causal_forcing
    (``renoise_flat``, recorded block plan) whose expected outputs come from a float64 run."""
    cfg = model.cfg
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(case))
    g = torch.Generator().manual_seed(2)
    draws = [[torch.randn(batch, frames, cfg.in_dim, *latent_hw, generator=g) for _ in range(n - 1)]
             for frames, n in zip(plan, steps)]
    first_steps = schedule.warp([1000 - i * (1000 // steps[0]) for i in range(steps[0])])
    later_steps = schedule.warp([1000, 500])
    inputs = {"noise": torch.randn(batch, sum(plan), cfg.in_dim, *latent_hw, generator=g),
              "prompt_embeds": torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g),
              "renoise_flat": torch.cat([d for block in draws for d in block], dim=1),
              "denoising_step_list": later_steps[:steps[-1]], "denoising_step_list_first_block": first_steps}
    if prefill_frames:
        inputs["initial_latent"] = torch.randn(batch, prefill_frames, cfg.in_dim, *latent_hw, generator=g)
    save_file(inputs, str(folder / "inputs.safetensors"))
    window = case["local_attn_size"]
    expected = sample_video(model.double(), inputs["prompt_embeds"].double(), len(plan), (cfg.in_dim, *latent_hw),
                            noise=NoiseSource(initial=inputs["noise"].double(),
                                              renoise=[[d.double() for d in block] for block in draws]),
                            batch_size=batch, settings=StreamSettings(
                                kv_window_frames=None if window == -1 else window, sink_frames=case["sink_size"],
                                frames_per_block=case["num_frame_per_block"],
                                first_block_frames=1 if case["independent_first_frame"] and not prefill_frames
                                else None,
                                shift=schedule.shift, timesteps=inputs["denoising_step_list"],
                                first_block_timesteps=first_steps,
                                prefill=inputs["initial_latent"].double() if prefill_frames else None))
    starts = torch.tensor([0] + plan[:-1]).cumsum(0) + prefill_frames
    save_file({"final_latents": expected.float(), "block_start_frame": starts,
               "block_num_frames": torch.tensor(plan), "block_num_steps": torch.tensor(steps)},
              str(folder / "outputs.safetensors"))
    model.float()


def test_parity_reproduces_flat_format_roots_with_other_plans_steps_and_shapes(tmp_path):
    """Frame-wise with a rolling window and sink, 3-step first block then 2-step blocks; independent
    first frame; an image-to-video prefill frame: other heads, sizes and batch than the fixtures."""
    cfg = OTHER_TINY
    root, schedule = tmp_path / "flat", FlowMatchSchedule(5.0)
    model = write_model_root(root, cfg)
    base = {"local_attn_size": -1, "sink_size": 0, "timestep_shift": 5.0, "context_noise": 0}
    write_flat_case(root / "fw_rolling_3then2", model,
                    {**base, "num_frame_per_block": 1, "independent_first_frame": False, "local_attn_size": 3,
                     "sink_size": 1}, [1] * 5, [3, 2, 2, 2, 2], (6, 4), 2, 0, schedule)
    write_flat_case(root / "iff_t2v", model, {**base, "num_frame_per_block": 2, "independent_first_frame": True},
                    [1, 2, 2], [2, 2, 2], (6, 4), 2, 0, schedule)
    write_flat_case(root / "fw_i2v", model, {**base, "num_frame_per_block": 1, "independent_first_frame": False},
                    [1] * 3, [4, 2, 2], (6, 4), 2, 1, schedule)
    comparisons = run_parity(root)
    assert {c.case for c in comparisons} == {"fw_rolling_3then2", "iff_t2v", "fw_i2v"}
    assert [c.tensor for c in comparisons if c.case == "iff_t2v"] == [
        "block_start_frame", "block_num_frames", "block_num_steps", "final_latents"]
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons]


def copy_case(source, target, case: str):
    """A fixture root with one case of ``source`` (files copied, so they can be perturbed)."""
    import shutil

    target.mkdir()
    for name in ("weights.safetensors", "model_config.json"):
        shutil.copy(source / name, target / name)
    shutil.copytree(source / case, target / case)
    return target / case


def test_framewise_and_causal_forcing_fixtures_are_reproduced(fixtures_dir):
    for family in ("selfforcing_framewise", "causal_forcing"):
        comparisons = run_parity(fixtures_dir / family)
        cases = {c.case for c in comparisons}
        assert len(cases) >= 3 and all(c.passed for c in comparisons), [c.line() for c in comparisons]
        assert {c.case for c in comparisons if c.tensor == "final_latents"} == cases


def test_parity_fails_on_perturbed_flat_format_inputs_and_outputs(fixtures_dir, tmp_path):
    """A later block's 2-step re-noise draw or the expected latents changed slightly: the case fails."""
    from safetensors.torch import load_file

    for label, filename, name, change in (
            ("renoise", "inputs.safetensors", "renoise_flat", lambda t: t.index_add(1, torch.tensor([t.shape[1] - 1]),
                                                                                  torch.full_like(t[:, :1], 0.01))),
            ("output", "outputs.safetensors", "final_latents", lambda t: t + 1e-3 * (t > 0))):
        case = copy_case(fixtures_dir / "causal_forcing", tmp_path / label, "fw_2step")
        tensors = load_file(str(case / filename))
        tensors[name] = change(tensors[name])
        save_file(tensors, str(case / filename))
        final = [c for c in run_parity(tmp_path / label) if c.tensor == "final_latents"]
        assert len(final) == 1 and not final[0].passed and final[0].max_abs_error > 1e-4, final[0].line()
