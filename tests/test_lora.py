"""LoRA adapters: identity at creation, switching, merge equals adapter forward, file layout."""
import os

import pytest
import torch

from selfforcing_core.lora import (LoRALinear, active_adapter, adapter_parameters, inject_lora, load_adapter,
                                   lora_layers, merge_lora, read_lora, save_lora)
from selfforcing_core.model import CausalWanModel, WanConfig

torch.set_num_threads(1)
TINY = WanConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, text_dim=32, text_len=16)


def tiny_inputs(batch=1):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, 16, 4, 4, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 5, 32, generator=g))


def randomise(model, adapter):
    with torch.no_grad():
        for p in adapter_parameters(model, adapter).values():
            p.normal_(0, 0.1)


def test_new_adapter_is_identity_and_targets_are_matched_by_name():
    torch.manual_seed(0)
    model = CausalWanModel(TINY)
    x, t, prompt = tiny_inputs()
    before = model(x, t, prompt, mode="bidirectional")
    names = inject_lora(model, "a", rank=4)
    assert len(names) == TINY.num_layers * 10
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with active_adapter(model, "a"):
        assert torch.equal(model(x, t, prompt, mode="bidirectional"), before)
    with pytest.raises(ValueError, match="no linear layer matches"):
        inject_lora(model, "b", rank=4, targets=("nonexistent",))


def test_adapters_switch_and_context_restores_state():
    torch.manual_seed(0)
    model = CausalWanModel(TINY)
    inject_lora(model, "a", rank=4)
    inject_lora(model, "b", rank=2, targets=("ffn.0",))
    randomise(model, "a")
    randomise(model, "b")
    x, t, prompt = tiny_inputs()
    base = model(x, t, prompt, mode="bidirectional")
    with active_adapter(model, "a"):
        out_a = model(x, t, prompt, mode="bidirectional")
        with active_adapter(model, "b", strength=0.5):
            out_b = model(x, t, prompt, mode="bidirectional")
        assert torch.equal(model(x, t, prompt, mode="bidirectional"), out_a)
    assert torch.equal(model(x, t, prompt, mode="bidirectional"), base)
    assert not torch.allclose(out_a, base) and not torch.allclose(out_b, base) and not torch.allclose(out_a, out_b)
    assert all(layer.active is None and all(s == 1.0 for s in layer.strength.values())
               for layer in lora_layers(model).values())


def test_saved_lora_merged_into_plain_model_equals_adapter_forward(tmp_path):
    torch.manual_seed(0)
    model = CausalWanModel(TINY)
    plain = CausalWanModel(TINY)
    plain.load_state_dict(model.state_dict())
    inject_lora(model, "gen", rank=4, alpha=2.0, targets=("self_attn.q", "cross_attn.v", "ffn.2", "head.head"))
    randomise(model, "gen")
    path = tmp_path / "sub" / "my.safetensors"
    save_lora(model, "gen", path)
    assert sorted(os.listdir(path.parent)) == ["my.safetensors"]  # no temporary file left behind
    x, t, prompt = tiny_inputs()
    with active_adapter(model, "gen"):
        expected = model(x, t, prompt, mode="bidirectional")
    original = {k: v.clone() for k, v in plain.state_dict().items()}
    assert merge_lora(plain, path) == 3 * TINY.num_layers + 1
    torch.testing.assert_close(plain(x, t, prompt, mode="bidirectional"), expected, atol=1e-5, rtol=1e-5)
    merge_lora(plain, path, strength=-1.0)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


def test_file_layout_is_comfyui_lora_down_up_alpha_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model = CausalWanModel(TINY)
    inject_lora(model, "gen", rank=3, alpha=6.0, targets=("self_attn.o",))
    randomise(model, "gen")
    path = tmp_path / "l.safetensors"
    save_lora(model, "gen", path)
    from safetensors.torch import load_file
    keys = set(load_file(path))
    assert keys == {f"diffusion_model.blocks.{i}.self_attn.o.{s}" for i in range(2)
                    for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    other = CausalWanModel(TINY)
    inject_lora(other, "gen", rank=3, targets=("self_attn.o",))
    load_adapter(other, "gen", path)
    for (name, p), q in zip(adapter_parameters(model, "gen").items(), adapter_parameters(other, "gen").values()):
        assert torch.equal(p, q), name
    assert lora_layers(other)["blocks.0.self_attn.o"].alpha["gen"] == 6.0


def test_read_lora_accepts_peft_names_and_rejects_other_files():
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    found = read_lora({"transformer.blocks.0.ffn.0.lora_A.weight": down, "transformer.blocks.0.ffn.0.lora_B.weight": up})
    name, (d, u, alpha) = next(iter(found.items()))
    assert name == "blocks.0.ffn.0" and d is down and u is up and alpha == 2.0
    with pytest.raises(ValueError, match="no LoRA tensors"):
        read_lora({"blocks.0.ffn.0.weight": torch.zeros(2, 2)})
    model = CausalWanModel(TINY)
    with pytest.raises(ValueError, match="blocks.7.ffn.0, which is not a linear layer of this model"):
        merge_lora(model, {"blocks.7.ffn.0.lora_down.weight": down, "blocks.7.ffn.0.lora_up.weight": up})
    with pytest.raises(ValueError, match="blocks.0, which is not a linear layer of this model"):  # a whole block
        merge_lora(model, {"blocks.0.lora_down.weight": down, "blocks.0.lora_up.weight": up})
