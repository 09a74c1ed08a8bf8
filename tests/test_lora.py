"""LoRA adapters (lora.py): identity at creation, switching, merge equals adapter forward; and the file
layouts read by lora_files.py."""
import os

import pytest
import torch

from selfforcing_core.lora import (LoRALinear, active_adapter, adapter_parameters, inject_lora, load_adapter,
                                   lora_layers, merge_lora, save_lora)
from selfforcing_core.lora_files import read_lora, read_lora_file
from selfforcing_core.model import CausalWanModel
from support.rounding import assert_within_float32_reductions, assert_within_roundings, wan_forward_reductions
from support.tiny import TINY

REDUCTIONS = wan_forward_reductions(TINY, tokens=3 * 2 * 2)  # tiny_inputs: 3 frames of 2 x 2 patches


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
    assert_within_float32_reductions(plain(x, t, prompt, mode="bidirectional"), expected, *REDUCTIONS)
    merged = {k: v.clone() for k, v in plain.state_dict().items()}
    merge_lora(plain, path, strength=-1.0)
    for key, value in plain.state_dict().items():  # W + d, then - d (the same d): two roundings
        assert_within_roundings(value, original[key], torch.maximum(merged[key].abs(), original[key].abs()), 2)


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


def lora_tensors(seed=0, rank=4):
    """down/up for two modules of TINY: {module: (down, up)}."""
    g = torch.Generator().manual_seed(seed)
    return {module: (torch.randn(rank, 64, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.1)
            for module, out in (("blocks.0.self_attn.q", 64), ("blocks.1.ffn.0", 128))}


def write_layouts(folder, pairs):
    """The same LoRA in every supported layout; returns {layout: path}."""
    from safetensors.torch import save_file
    comfy, peft, kohya = {}, {}, {}
    for module, (down, up) in pairs.items():
        comfy |= {f"diffusion_model.{module}.lora_down.weight": down, f"diffusion_model.{module}.lora_up.weight": up,
                  f"diffusion_model.{module}.alpha": torch.tensor(8.0)}
        peft |= {f"base_model.model.{module}.lora_A.weight": down, f"base_model.model.{module}.lora_B.weight": up}
        stem = "lora_unet_" + module.replace(".", "_")
        kohya |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(8.0)}
    paths = {name: folder / name / file for name, file in (
        ("comfyui", "lora.safetensors"), ("peft_config", "adapter_model.safetensors"),
        ("peft_bare", "adapter_model.safetensors"), ("longlive_pt", "lora.pt"), ("kohya", "lora.safetensors"))}
    for path in paths.values():
        path.parent.mkdir()
    save_file(comfy, str(paths["comfyui"]))
    save_file(peft, str(paths["peft_config"]))
    (paths["peft_config"].parent / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    save_file(peft, str(paths["peft_bare"]))
    torch.save({"generator_lora": peft, "critic_lora": {k: -v for k, v in peft.items()}, "step": 3},
               paths["longlive_pt"])
    save_file(kohya, str(paths["kohya"]))
    return paths


def test_every_layout_reads_to_the_same_adapters_and_says_where_alpha_came_from(tmp_path):
    pairs = lora_tensors()
    paths = write_layouts(tmp_path, pairs)
    sources = {}
    for layout, path in paths.items():
        alpha = 8.0 if layout in ("peft_bare", "longlive_pt") else None  # the file stores none: the user sets it
        lora = read_lora_file(path, alpha=alpha)
        assert set(lora.adapters) == set(pairs), layout
        for module, (down, up, layer_alpha) in lora.adapters.items():
            assert torch.equal(down, pairs[module][0]) and torch.equal(up, pairs[module][1]), layout
            assert layer_alpha == 8.0, layout
        sources[layout] = lora.alpha_source
    assert sources["comfyui"] == sources["kohya"] == "stored in the file"
    assert "adapter_config.json" in sources["peft_config"] and "as set" in sources["longlive_pt"]
    default = read_lora_file(paths["peft_bare"])  # nothing anywhere: alpha = rank, scale 1
    assert {a for _, _, a in default.adapters.values()} == {4.0} and "rank" in default.alpha_source
    assert read_lora_file(paths["kohya"]).layout == "kohya" and read_lora_file(paths["longlive_pt"]).layout == "peft"


def test_non_finite_lora_tensors_are_refused_by_name():
    down, up = torch.randn(2, 64), torch.randn(64, 2)
    up[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.self_attn\.q\.lora_up\.weight.*non-finite"):
        read_lora_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up})


def test_attached_lora_with_diffs_changes_strength_without_reload_and_equals_a_merge():
    """Low-rank parts unmerged, .diff / .diff_b / .diff_m merged reversibly: any strength equals
    merging at that strength, and strength 0 is the base model bit for bit."""
    from selfforcing_core.lora import attach_lora
    torch.manual_seed(0)
    base = CausalWanModel(TINY)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for module, (down, up) in lora_tensors().items():
        tensors |= {f"diffusion_model.{module}.lora_down.weight": down, f"diffusion_model.{module}.lora_up.weight": up}
    tensors |= {"diffusion_model.blocks.0.cross_attn.k.diff": 0.05 * torch.randn(64, 64, generator=g),
                "diffusion_model.blocks.1.ffn.2.diff_b": 0.05 * torch.randn(64, generator=g),
                "diffusion_model.blocks.0.diff_m": 0.05 * torch.randn(1, 6, 64, generator=g)}
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = CausalWanModel(TINY)
    model.load_state_dict(original)
    attached = attach_lora(model, tensors, strength=1.0)
    assert "3 full-weight diffs" in attached.describe() and "unmerged" in attached.describe()
    x, t, prompt = tiny_inputs()
    with torch.no_grad():
        for strength in (1.0, 0.4):
            attached.set_strength(strength)
            merged = CausalWanModel(TINY)
            merged.load_state_dict(original)
            assert merge_lora(merged, tensors, strength) == 5
            assert_within_float32_reductions(model(x, t, prompt, mode="bidirectional"),
                                             merged(x, t, prompt, mode="bidirectional"), *REDUCTIONS)
        attached.set_strength(0.0)
        base.eval()
        assert torch.equal(model(x, t, prompt, mode="bidirectional"), base(x, t, prompt, mode="bidirectional"))


def test_attached_lora_on_16_bit_weights_runs_in_their_dtype_as_close_as_a_16_bit_merge():
    """On bf16 weights the unmerged adapters are bf16 (no float32 pass per layer); their output is
    no further from the float32 merge than merging into the bf16 weights is (twice that, for the
    adapters' own rounding), and strength 0 is the bf16 base bit for bit."""
    from selfforcing_core.lora import attach_lora
    torch.manual_seed(0)
    original = CausalWanModel(TINY).state_dict()
    tensors = {f"diffusion_model.{module}.lora_{part}.weight": tensor
               for module, (down, up) in lora_tensors().items() for part, tensor in (("down", down), ("up", up))}

    def built(dtype, strength=None):
        model = CausalWanModel(TINY)
        model.load_state_dict(original)
        model = model.to(dtype).eval()
        if strength is not None:
            merge_lora(model, tensors, strength)
        return model

    x, t, prompt = tiny_inputs()
    with torch.no_grad():
        reference = built(torch.float32, 1.0)(x, t, prompt, mode="bidirectional")
        merged_error = (built(torch.bfloat16, 1.0)(x, t, prompt, mode="bidirectional").float() - reference).abs().max()
        model = built(torch.bfloat16)
        attached = attach_lora(model, tensors)
        assert model.blocks[0].self_attn.q.down["file"].dtype == torch.bfloat16
        attached_error = (model(x, t, prompt, mode="bidirectional").float() - reference).abs().max()
        assert 0 < attached_error <= 2 * merged_error, (attached_error, merged_error)
        attached.set_strength(0.0)
        assert torch.equal(model(x, t, prompt, mode="bidirectional"), built(torch.bfloat16)(x, t, prompt,
                                                                                             mode="bidirectional"))
