"""LongLive fixtures: every case of the shipped set is reproduced; a fixture root of the same format
at other sizes, window, sink and switch block is reproduced too; any perturbed input, expected
output, second prompt or LoRA makes the parity command fail."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfforcing_core.kv_cache import CacheRules
from selfforcing_core.lora import active_adapter, attach_lora
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.parity import run_parity
from selfforcing_core.rollout import NoiseSource, PromptSwitch, StreamSettings, sample_video
from selfforcing_core.schedule import FlowMatchSchedule
from support.tiny import OTHER_TINY

CASES = ("infinite", "lora", "rolling_sink", "switch", "switch_noglobalsink")


def test_parity_reproduces_every_shipped_longlive_case(fixtures_dir):
    comparisons = run_parity(fixtures_dir / "longlive")
    assert {c.case for c in comparisons} == set(CASES)
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons if not c.passed]


def one_case_root(fixtures_dir, tmp_path, case: str):
    """A copy of the LongLive root holding only ``case`` (writable)."""
    root = tmp_path / "longlive"
    root.mkdir()
    for name in ("weights.safetensors", "model_config.json"):
        shutil.copy(fixtures_dir / "longlive" / name, root / name)
    shutil.copytree(fixtures_dir / "longlive" / case, root / case)
    for path in (root / case).iterdir():
        path.chmod(0o644)
    return root


def perturb_tensor(path, name, amount=1e-2):
    tensors = load_file(str(path))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[: max(1, tensors[name].numel() // 4)] += amount
    save_file(tensors, str(path))


@pytest.mark.parametrize("case, file, name", [
    ("rolling_sink", "inputs.safetensors", "noise"),
    ("infinite", "outputs.safetensors", "final_latents"),
    ("switch", "inputs.safetensors", "prompt_embeds_2"),
    ("switch_noglobalsink", "inputs.safetensors", "switch_block"),
    ("lora", "lora.pt", "generator_lora"),
])
def test_parity_fails_when_a_fixture_file_is_perturbed(fixtures_dir, tmp_path, case, file, name):
    root = one_case_root(fixtures_dir, tmp_path, case)  # unperturbed, it passes (test above)
    path = root / case / file
    if name == "switch_block":
        tensors = load_file(str(path))
        save_file({**tensors, name: tensors[name] + 1}, str(path))
    elif file == "lora.pt":
        data = torch.load(path, weights_only=True)
        key = sorted(k for k in data[name] if k.endswith("lora_B.weight"))[0]
        data[name][key] = data[name][key] + 0.05
        torch.save(data, path)
        (root / case / "lora.safetensors").unlink()  # the .pt is the one read; keep no fallback
    else:
        perturb_tensor(path, name)
    comparisons = run_parity(root)
    assert not all(c.passed for c in comparisons), [c.line() for c in comparisons]


def write_longlive_root(root, cfg: WanConfig, latent_hw, window: int, sink: int, num_blocks: int):
    """A LongLive fixture root (plain relative-RoPE, two switches, a LoRA case) whose expected
    outputs come from an independent float64 run of the same rollout."""
    torch.manual_seed(0)
    model = CausalWanModel(cfg)
    root.mkdir()
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(root / "weights.safetensors"))
    model_json = {"patch_size": list(cfg.patch_size), "text_len": cfg.text_len, "in_dim": cfg.in_dim,
                  "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim,
                  "out_dim": cfg.out_dim, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
                  "qk_norm": cfg.qk_norm, "cross_attn_norm": cfg.cross_attn_norm, "eps": cfg.eps}
    (root / "model_config.json").write_text(json.dumps({"model": model_json}))
    g = torch.Generator().manual_seed(1)
    rank, alpha = 3, 7.0
    lora = {}
    for layer in range(cfg.num_layers):
        for module in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                       "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"):
            out_f, in_f = model.get_submodule(f"blocks.{layer}.{module}").weight.shape
            stem = f"base_model.model.blocks.{layer}.{module}"
            lora[f"{stem}.lora_A.weight"] = 0.2 * torch.randn(rank, in_f, generator=g)
            lora[f"{stem}.lora_B.weight"] = 0.2 * torch.randn(out_f, rank, generator=g)
    cases = {
        "infinite": dict(use_infinite_attention=True, global_sink=True),
        "switch": dict(use_infinite_attention=False, global_sink=True, switch_block=num_blocks // 2 + 1),
        "switch_noglobalsink": dict(use_infinite_attention=True, global_sink=False, switch_block=num_blocks // 2 + 1),
        "lora": dict(use_infinite_attention=False, global_sink=True, lora_rank=rank, lora_alpha=alpha),
    }
    schedule = FlowMatchSchedule(5.0)
    frames = 3 * num_blocks
    for name, extra in cases.items():
        folder = root / name
        folder.mkdir()
        config = {"num_blocks": num_blocks, "local_attn_size": window, "sink_size": sink,
                  "num_frame_per_block": 3, "timestep_shift": 5.0, "context_noise": 0, **extra}
        (folder / "config.json").write_text(json.dumps(config))
        inputs = {"noise": torch.randn(1, frames, cfg.in_dim, *latent_hw, generator=g),
                  "prompt_embeds": torch.randn(1, cfg.text_len, cfg.text_dim, generator=g),
                  "renoise": torch.randn(num_blocks, 3, 1, 3, cfg.in_dim, *latent_hw, generator=g),
                  "denoising_step_list": schedule.warp()}
        switches = []
        if "switch_block" in extra:
            inputs["prompt_embeds_2"] = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
            inputs["switch_block"] = torch.tensor([extra["switch_block"]])
            switches = [PromptSwitch(extra["switch_block"], inputs["prompt_embeds_2"].double())]
        save_file(inputs, str(folder / "inputs.safetensors"))
        reference = CausalWanModel(cfg)
        reference.load_state_dict(model.state_dict())
        if "lora_rank" in extra:
            torch.save({"generator_lora": lora, "critic_lora": {k: -v for k, v in lora.items()}, "step": 0},
                       folder / "lora.pt")
            attach_lora(reference, {k.replace("base_model.model.", ""): v for k, v in lora.items()}, alpha=alpha)
        rules = CacheRules(rope="relative" if extra["use_infinite_attention"] else "absolute", protect_sink=True,
                           switch_recache="window", global_sink=extra["global_sink"])
        with torch.no_grad():
            expected = sample_video(reference.double(), inputs["prompt_embeds"].double(), num_blocks,
                                    (cfg.in_dim, *latent_hw),
                                    noise=NoiseSource(initial=inputs["noise"].double(), renoise=inputs["renoise"].double()),
                                    settings=StreamSettings(kv_window_frames=window, sink_frames=sink,
                                                            shift=schedule.shift,
                                                            timesteps=inputs["denoising_step_list"],
                                                            prompt_switches=switches, cache_rules=rules))
        save_file({"final_latents": expected.float()}, str(folder / "outputs.safetensors"))


def test_parity_reproduces_a_longlive_root_with_other_shapes_window_and_switch(tmp_path):
    write_longlive_root(tmp_path / "other", OTHER_TINY, latent_hw=(6, 4), window=6, sink=3, num_blocks=5)
    comparisons = run_parity(tmp_path / "other")
    assert {c.case for c in comparisons} == {"infinite", "switch", "switch_noglobalsink", "lora"}
    assert all(c.passed and c.max_abs_error < 1e-4 for c in comparisons), [c.line() for c in comparisons]
