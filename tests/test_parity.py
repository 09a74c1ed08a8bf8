"""The parity command reads everything from the fixture files: a fixture root of the same format
with other sizes, head counts, windows, sinks, batch and prefill is reproduced too."""
import json

import torch
from safetensors.torch import save_file

from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.parity import run_parity
from selfforcing_core.rollout import NoiseSource, sample_video
from selfforcing_core.schedule import FlowMatchSchedule


def write_fixture_root(root, cfg: WanConfig, case: dict, latent_hw, batch: int, prefill_frames: int):
    """A fixture root in the official format whose expected outputs come from an independent
    float64 run of the same rollout (so the float32 parity run must get within tolerance)."""
    torch.manual_seed(0)
    model = CausalWanModel(cfg)
    root.mkdir()
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(root / "weights.safetensors"))
    model_json = {"model_type": "t2v", "patch_size": list(cfg.patch_size), "text_len": cfg.text_len,
                  "in_dim": cfg.in_dim, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim,
                  "text_dim": cfg.text_dim, "out_dim": cfg.out_dim, "num_heads": cfg.num_heads,
                  "num_layers": cfg.num_layers, "qk_norm": cfg.qk_norm, "cross_attn_norm": cfg.cross_attn_norm,
                  "eps": cfg.eps}
    (root / "model_config.json").write_text(json.dumps({"model": model_json}))
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
                            timesteps=inputs["denoising_step_list"], schedule=schedule,
                            kv_window_frames=None if window == -1 else window, sink_frames=case["sink_size"],
                            prefill=inputs["initial_latent"].double() if prefill_frames else None,
                            batch_size=batch)
    save_file({"final_latents": expected.float()}, str(folder / "outputs.safetensors"))


def test_parity_reproduces_a_fixture_root_with_other_shapes(tmp_path):
    cfg = WanConfig(dim=48, ffn_dim=96, num_layers=2, num_heads=3, text_dim=24, text_len=8)
    case = {"num_blocks": 3, "local_attn_size": 5, "sink_size": 2, "num_frame_per_block": 3,
            "timestep_shift": 8.0, "context_noise": 0}
    write_fixture_root(tmp_path / "other", cfg, case, latent_hw=(6, 4), batch=2, prefill_frames=3)
    comparisons = run_parity(tmp_path / "other")
    assert [c.tensor for c in comparisons] == ["final_latents"]
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons]
    assert comparisons[0].max_abs_error < 1e-4


def test_parity_reproduces_decoder_fixture_roots_with_other_widths_and_shapes(tmp_path):
    """TAEHV and Wan VAE fixture roots at other widths, frame counts and sizes, with expected
    tensors from a float64 run: the parity command must rebuild everything from the files."""
    from decoder_weights import taehv_state_dict, wan_vae_state_dict
    from selfforcing_core.latents import load_codec, normalised_to_raw, raw_to_normalised

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
