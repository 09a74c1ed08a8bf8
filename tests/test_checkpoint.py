"""Checkpoint loading: every supported layout, the official training dict, and clear refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfforcing_core.checkpoint import CheckpointError, load_generator
from selfforcing_core.config import WanConfig
from selfforcing_core.families import FAMILIES
from support.tiny import TINY, tiny_model


def wan_state_dict(seed=0):
    return {k: v.clone() for k, v in tiny_model(seed).state_dict().items()}


def assert_same_weights(model, state_dict):
    loaded = model.state_dict()
    assert set(loaded) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value), key


def diffusers_name(key):
    """Wan name -> diffusers WanTransformer3DModel name, written out by hand for the test."""
    top = {"time_embedding.0": "condition_embedder.time_embedder.linear_1",
           "time_embedding.2": "condition_embedder.time_embedder.linear_2",
           "time_projection.1": "condition_embedder.time_proj",
           "text_embedding.0": "condition_embedder.text_embedder.linear_1",
           "text_embedding.2": "condition_embedder.text_embedder.linear_2",
           "head.head": "proj_out"}
    if key == "head.modulation":
        return "scale_shift_table"
    for old, new in top.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if not key.startswith("blocks."):
        return key
    _, index, rest = key.split(".", 2)
    block = {"modulation": "scale_shift_table", "norm3.weight": "norm2.weight", "norm3.bias": "norm2.bias",
             "ffn.0.weight": "ffn.net.0.proj.weight", "ffn.0.bias": "ffn.net.0.proj.bias",
             "ffn.2.weight": "ffn.net.2.weight", "ffn.2.bias": "ffn.net.2.bias"}
    if rest in block:
        return f"blocks.{index}.{block[rest]}"
    attn, name, param = rest.split(".")
    attn = {"self_attn": "attn1", "cross_attn": "attn2"}[attn]
    name = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}.get(name, name)
    return f"blocks.{index}.{attn}.{name}.{param}"


@pytest.mark.parametrize("layout", ["wan", "official", "comfyui", "diffusers"])
def test_each_layout_loads_to_the_same_model(tmp_path, layout):
    state_dict = wan_state_dict()
    written = {
        "wan": state_dict,
        "official": {f"model.{k}": v for k, v in state_dict.items()},
        "comfyui": {**{f"model.diffusion_model.{k}": v for k, v in state_dict.items()},
                    "first_stage_model.decoder.conv1.weight": torch.zeros(1),
                    "text_encoders.umt5xxl.shared.weight": torch.zeros(1)},
        "diffusers": {diffusers_name(k): v for k, v in state_dict.items()},
    }[layout]
    path = tmp_path / "model.safetensors"
    save_file(written, str(path))
    model = load_generator(path, num_heads=2, text_len=16)
    assert model.layout == layout
    assert model.cfg == TINY
    assert_same_weights(model, state_dict)


def test_official_training_dict_uses_generator_ema(tmp_path):
    ema, other = wan_state_dict(0), wan_state_dict(1)
    prefixed = lambda sd: {f"model.{k}": v for k, v in sd.items()}
    torch.save({"generator": prefixed(other), "critic": prefixed(other), "generator_ema": prefixed(ema)},
               tmp_path / "self_forcing_dmd.pt")
    assert_same_weights(load_generator(tmp_path / "self_forcing_dmd.pt", num_heads=2, text_len=16), ema)
    torch.save({"generator": prefixed(other)}, tmp_path / "ode_init.pt")
    assert_same_weights(load_generator(tmp_path / "ode_init.pt", num_heads=2, text_len=16), other)


@pytest.mark.parametrize("family,stored,expected", [
    ("causal_forcing_chunkwise", ("generator", "generator_ema"), "generator"),
    ("causal_forcing_framewise", ("generator", "generator_ema"), "generator_ema"),
    ("self_forcing", ("generator", "generator_ema"), "generator_ema"),
    ("causal_forcing_chunkwise", ("generator_ema",), "generator_ema"),
    ("causal_forcing_framewise_2step", ("generator",), "generator"),
])
def test_loader_takes_the_familys_preferred_entry_of_a_training_dict(tmp_path, family, stored, expected):
    """Causal Forcing's chunk-wise checkpoint is run from 'generator', the frame-wise ones (and Self
    Forcing) from 'generator_ema': with both entries in the file the family's first choice loads,
    with one entry that one does."""
    weights = {"generator": wan_state_dict(1), "generator_ema": wan_state_dict(2)}
    training_dict = {name: {f"model.{k}": v for k, v in weights[name].items()} for name in stored}
    training_dict["critic"] = {f"model.{k}": v for k, v in wan_state_dict(3).items()}
    torch.save(training_dict, tmp_path / "causal_forcing.pt")
    model = load_generator(tmp_path / "causal_forcing.pt", num_heads=2, text_len=16,
                           checkpoint_keys=FAMILIES[family].checkpoint_keys)
    assert model.checkpoint_entry == expected and model.layout == "official"
    assert_same_weights(model, weights[expected])


def test_shipped_checkpoint_example_picks_generator_ema(fixtures_dir):
    root = fixtures_dir / "selfforcing"
    heads = json.loads((root / "model_config.json").read_text())["model"]["num_heads"]
    model = load_generator(root / "checkpoint_example.pt", num_heads=heads, text_len=16)
    expected = {k[len("model."):]: v for k, v in load_file(str(root / "weights.safetensors")).items()}
    assert_same_weights(model, expected)


def test_config_is_inferred_from_the_real_1p3b_key_layout(fixtures_dir):
    shapes = json.loads((fixtures_dir / "selfforcing" / "real_model_keys_wan2_1_1p3b.json").read_text())
    state_dict = {k[len("model."):]: torch.empty(shape, device="meta")
                  for k, shape in shapes["causal_wan_1_3b_generator_ema"].items()}
    cfg = WanConfig.from_state_dict(state_dict)
    assert (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (1536, 8960, 30, 12, 128)
    assert (cfg.text_dim, cfg.freq_dim, cfg.in_dim, cfg.out_dim, cfg.qk_norm, cfg.cross_attn_norm) == \
        (4096, 256, 16, 16, True, True)


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                            ("fp32", torch.float32), ("auto", torch.float32)])
def test_weights_are_cast_on_load(dtype, expected):
    model = load_generator(wan_state_dict(), dtype=dtype, num_heads=2, text_len=16)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "missing.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unsupported checkpoint extension"):
        load_generator(tmp_path / "notes.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        load_generator(tmp_path / "broken.safetensors")
    save_file({"decoder.conv1.weight": torch.zeros(2, 2), "encoder.conv1.weight": torch.zeros(2)},
              str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="Wan VAE"):
        load_generator(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="unsupported weight dtype"):
        load_generator(wan_state_dict(), dtype="int8", num_heads=2)


def test_arbitrary_pickles_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"generator_ema": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_generator(tmp_path / "evil.pt")


def test_incomplete_or_mismatched_state_dicts_load_nothing():
    state_dict = wan_state_dict()
    del state_dict["blocks.1.ffn.2.bias"]
    state_dict["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        load_generator(state_dict, num_heads=2, text_len=16)
    message = str(error.value)
    assert "layout: wan" in message and "blocks.1.ffn.2.bias" in message and "blocks.0.extra.weight" in message
    state_dict = wan_state_dict()
    state_dict["blocks.0.self_attn.q.bias"] = torch.zeros(65)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*self_attn\.q\.bias"):
        load_generator(state_dict, num_heads=2, text_len=16)


@pytest.mark.parametrize("bf16_supported,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_is_16_bit_on_cuda(monkeypatch, bf16_supported, expected):
    from selfforcing_core.checkpoint import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert resolve_dtype("auto", wan_state_dict(), "cuda") == expected
    assert resolve_dtype("auto", wan_state_dict(), "cpu") == torch.float32  # the file's own dtype


def test_legacy_format_pickles_load(tmp_path):
    """Files written by old torch versions (not zip archives) cannot be memory-mapped but must load."""
    state_dict = wan_state_dict()
    torch.save({"generator_ema": {f"model.{k}": v for k, v in state_dict.items()}}, tmp_path / "old.pt",
               _use_new_zipfile_serialization=False)
    assert_same_weights(load_generator(tmp_path / "old.pt", num_heads=2, text_len=16), state_dict)
