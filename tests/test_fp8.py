"""FP8 block linears: quantisation error bounds, file layouts, compute paths, accuracy vs fp32."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from selfforcing_core.checkpoint import load_generator
from selfforcing_core.fp8 import (FP8Error, FP8Linear, choose_fp8_matmul, float8_dtype, quantise,
                                  split_fp8_scales)
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.rollout import NoiseSource, sample_video
from support.tiny import TINY

LOAD = dict(dtype="fp32", num_heads=2, text_len=16)
# (relative rounding error of a normal value, smallest subnormal) of each format
FORMAT_PRECISION = {"e4m3fn": (2.0 ** -4, 2.0 ** -9), "e5m2": (2.0 ** -3, 2.0 ** -16)}


def tiny_state_dict(seed=0):
    torch.manual_seed(seed)
    return CausalWanModel(TINY).state_dict()


def rel_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(cfg, frames=3, size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, frames, cfg.in_dim, size, size, generator=g), torch.full((1, frames), 625.0),
            torch.randn(1, 5, cfg.text_dim, generator=g))


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantisation_error_within_format_rounding(fmt, granularity):
    weight = torch.randn(48, 80) * torch.logspace(-2, 1, 48)[:, None]
    stored, scale = quantise(weight, fmt, granularity)
    assert stored.dtype == float8_dtype(fmt)
    assert scale.shape == (() if granularity == "tensor" else (48, 1))
    relative, subnormal = FORMAT_PRECISION[fmt]
    bound = relative * weight.abs() + subnormal * scale  # half an ulp, at worst a subnormal step
    assert ((stored.float() * scale - weight).abs() <= bound * 1.0001).all()
    largest = torch.finfo(stored.dtype).max  # each tensor's / row's largest magnitude hits the format max
    peak = stored.float().abs().amax() if granularity == "tensor" else stored.float().abs().amax(dim=1)
    assert torch.all(peak == largest)


def test_channel_scales_beat_tensor_scale_on_rows_of_different_magnitude():
    weight = torch.randn(64, 64) * torch.logspace(-5, 0, 64)[:, None]  # below e4m3fn's normal range
    worst_row_error = {}
    for granularity in ("tensor", "channel"):
        stored, scale = quantise(weight, "e4m3fn", granularity)
        row_error = (stored.float() * scale - weight).norm(dim=1) / weight.norm(dim=1)
        worst_row_error[granularity] = row_error.max().item()
    assert worst_row_error["channel"] < 2.0 ** -4 < worst_row_error["tensor"]


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_linear_dequantise_path_equals_linear_on_dequantised_weight(granularity):
    weight, bias, x = torch.randn(32, 48), torch.randn(32), torch.randn(2, 7, 48)
    layer = FP8Linear(*quantise(weight, "e4m3fn", granularity), bias)
    expected = F.linear(x, layer.weight.float() * layer.scale_weight, bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_scaled_mm_path_agrees_with_dequantise_path(granularity):
    weight, bias, x = torch.randn(32, 48) / 7, torch.randn(32), torch.randn(2, 16, 48)
    layer = FP8Linear(*quantise(weight, "e4m3fn", granularity), bias)
    reference = layer(x)
    layer.matmul = "scaled_mm"
    try:
        fast = layer(x)
    except RuntimeError as error:
        pytest.skip(f"torch._scaled_mm not available on this CPU build: {error}")
    # the FP8 matmul also rounds activations to e4m3fn: at most 2^-4 relative per element
    assert rel_error(fast, reference) < 2.0 ** -4


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_set_weight_requantises_in_the_layers_format(granularity):
    layer = FP8Linear(*quantise(torch.randn(32, 48), "e5m2", granularity), None)
    new_weight = torch.randn(32, 48) * 3
    layer.set_weight(new_weight)
    assert layer.weight.dtype == torch.float8_e5m2 and layer.granularity == granularity
    assert rel_error(layer.dequantised(torch.float32), new_weight) < 2.0 ** -3


def test_cpu_compute_path_is_dequantise_and_reported():
    model = load_generator(tiny_state_dict(), fp8="e4m3fn", **LOAD)
    report = choose_fp8_matmul(model, "cpu")
    assert "20 linear layers" in report and "dequantise per layer" in report and "cpu" in report
    assert {m.matmul for m in model.modules() if isinstance(m, FP8Linear)} == {"dequantise"}
    assert choose_fp8_matmul(load_generator(tiny_state_dict(), **LOAD), "cpu") == "FP8: off"


def test_only_block_linears_are_stored_in_fp8():
    model = load_generator(tiny_state_dict(), fp8="e5m2", **LOAD)
    fp8_names = {name for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    expected = {f"blocks.{i}.{attn}.{p}" for i in range(2) for attn in ("self_attn", "cross_attn") for p in "qkvo"}
    expected |= {f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)}
    assert fp8_names == expected
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] in fp8_names and name.endswith(".weight"):
            assert tensor.dtype == torch.float8_e5m2, name
        else:
            assert tensor.dtype == torch.float32, name  # embeddings, norms, modulation, head, biases, scales


def comfy_scaled_fp8_file(state_dict):
    """A ComfyUI full checkpoint in its scaled-fp8 layout, quantised per tensor."""
    names = {k[:-len(".weight")] for k in state_dict if k.startswith("blocks.") and k.endswith(".weight")
             and state_dict[k].ndim == 2}
    out = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in state_dict.items():
        layer = key[:-len(".weight")]
        if layer in names:
            stored, scale = quantise(value, "e4m3fn", "tensor")
            out[f"model.diffusion_model.{key}"] = stored
            out[f"model.diffusion_model.{layer}.scale_weight"] = scale
            out[f"model.diffusion_model.{layer}.scale_input"] = torch.ones(())
        else:
            out[f"model.diffusion_model.{key}"] = value
    return out


def dequantised_reference(file_dict):
    """The float state dict a scaled-fp8 file stands for (weight * scale_weight)."""
    weights, scales = split_fp8_scales({k.removeprefix("model.diffusion_model."): v for k, v in file_dict.items()})
    return {k: v.float() * scales[k[:-len(".weight")]] if k[:-len(".weight")] in scales else v.float()
            for k, v in weights.items()}


def test_comfyui_scaled_fp8_file_loads_exactly(tmp_path):
    file_dict = comfy_scaled_fp8_file(tiny_state_dict())
    path = tmp_path / "wan_fp8_scaled.safetensors"
    save_file(file_dict, str(path))
    model = load_generator(path, fp8="e4m3fn", **LOAD)
    layer = model.blocks[1].ffn[2]
    assert isinstance(layer, FP8Linear)
    assert torch.equal(layer.weight.view(torch.uint8), file_dict["model.diffusion_model.blocks.1.ffn.2.weight"].view(torch.uint8))
    reference = load_generator(dequantised_reference(file_dict), **LOAD)
    x, t, prompt = inputs(TINY)
    torch.testing.assert_close(model(x, t, prompt, mode="bidirectional"),
                               reference(x, t, prompt, mode="bidirectional"), rtol=0, atol=0)
    # fp8 "off" dequantises the file into plain float linears
    plain = load_generator(path, fp8="off", **LOAD)
    assert not any(isinstance(m, FP8Linear) for m in plain.modules())
    torch.testing.assert_close(plain.blocks[1].ffn[2].weight, reference.blocks[1].ffn[2].weight)


def test_plain_fp8_tensors_without_scales_load_with_unit_scale():
    state_dict = {k: v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v
                  for k, v in tiny_state_dict().items()}
    model = load_generator(state_dict, fp8="e4m3fn", **LOAD)
    layer = model.blocks[0].self_attn.q
    assert isinstance(layer, FP8Linear) and layer.scale_weight.item() == 1.0
    torch.testing.assert_close(layer.dequantised(torch.float32), state_dict["blocks.0.self_attn.q.weight"].float())


def test_fp8_model_state_dict_reloads_bit_exactly():
    model = load_generator(tiny_state_dict(), fp8="e4m3fn", fp8_granularity="channel", **LOAD)
    again = load_generator(model.state_dict(), fp8="e4m3fn", **LOAD)
    x, t, prompt = inputs(TINY)
    assert torch.equal(model(x, t, prompt, mode="bidirectional"), again(x, t, prompt, mode="bidirectional"))


@pytest.mark.parametrize("scale, problem", [
    (torch.tensor(float("nan")), "non-finite"),
    (torch.tensor(-0.5), "non-positive"),
    (torch.ones(3), "shape"),
    (torch.ones((), dtype=torch.int32), "dtype"),
])
def test_corrupt_scale_tensor_is_rejected_by_name(scale, problem):
    file_dict = comfy_scaled_fp8_file(tiny_state_dict())
    file_dict["model.diffusion_model.blocks.0.ffn.0.scale_weight"] = scale
    with pytest.raises(FP8Error, match=rf"blocks\.0\.ffn\.0.*{problem}|{problem}.*blocks\.0\.ffn\.0") as error:
        load_generator(file_dict, fp8="e4m3fn", **LOAD)
    assert "corrupt" in str(error.value) or "dtype" in str(error.value)


def test_requests_fp8_on_torch_without_float8(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(FP8Error, match="no float8 dtypes.*'off'"):
        load_generator(tiny_state_dict(), fp8="e4m3fn", **LOAD)


def test_unknown_format_and_granularity_are_rejected():
    with pytest.raises(FP8Error, match="unknown FP8 format 'e3m4'"):
        load_generator(tiny_state_dict(), fp8="e3m4", **LOAD)
    with pytest.raises(FP8Error, match="granularity 'row'"):
        load_generator(tiny_state_dict(), fp8="e4m3fn", fp8_granularity="row", **LOAD)


# Accuracy on a model large enough to matter. Bounds: about 3x the values measured on this
# machine (e4m3fn: 0.6% block, 0.8% rollout; e5m2: 1.1% / 1.5%), well under the per-weight
# rounding error of the formats (2^-4 = 6.3% and 2^-3 = 12.5%).
ACCURACY_BOUNDS = {"e4m3fn": (0.02, 0.025), "e5m2": (0.04, 0.05)}  # (one block's output, 2-block rollout)


PROMPT_512 = torch.randn(1, 20, 256, generator=torch.Generator().manual_seed(5))


def block0_and_rollout(model):
    captured = []
    hook = model.blocks[0].register_forward_hook(lambda module, args, output: captured.append(output))
    x, t, _ = inputs(model.cfg, size=8)
    model(x, t, PROMPT_512, mode="bidirectional")
    hook.remove()
    video = sample_video(model, PROMPT_512, 2, (16, 8, 8), noise=NoiseSource(torch.Generator().manual_seed(3)))
    return captured[0], video


@pytest.fixture(scope="module")
def dim512_reference():
    """dim 512, 3 layers, heavy-tailed (Student-t) block weights of std 1/sqrt(fan_in), in fp32:
    its state dict, block-0 output and 2-block rollout."""
    torch.manual_seed(0)
    cfg = WanConfig(dim=512, ffn_dim=2048, num_layers=3, num_heads=4, text_dim=256, text_len=32)
    model = CausalWanModel(cfg).eval().requires_grad_(False)
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):
            sample = torch.distributions.StudentT(4.0).sample(module.weight.shape)
            module.weight.copy_(sample / sample.std() / module.in_features ** 0.5)
    return (model.state_dict(), *block0_and_rollout(model))


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_fp8_accuracy_of_block_output_and_two_block_rollout(dim512_reference, fmt):
    state_dict, block_ref, video_ref = dim512_reference
    quantised = load_generator(state_dict, dtype="fp32", num_heads=4, text_len=32, fp8=fmt)
    block_fp8, video_fp8 = block0_and_rollout(quantised)
    block_bound, rollout_bound = ACCURACY_BOUNDS[fmt]
    block_error, rollout_error = rel_error(block_fp8, block_ref), rel_error(video_fp8, video_ref)
    print(f"{fmt}: block-0 output rel. error {block_error:.4f}, 2-block rollout {rollout_error:.4f}")
    assert 0 < block_error < block_bound
    assert 0 < rollout_error < rollout_bound


def test_lora_merge_into_fp8_layers_requantises_the_merged_weight():
    from selfforcing_core.lora import merge_lora

    torch.manual_seed(0)
    state_dict = {k: v.clone() for k, v in CausalWanModel(WanConfig(dim=128, ffn_dim=256, num_layers=1, num_heads=1,
                                                                    text_dim=32)).state_dict().items()}
    name = "blocks.0.self_attn.q"
    lora = {f"diffusion_model.{name}.lora_down.weight": torch.randn(4, 128) * 0.3,
            f"diffusion_model.{name}.lora_up.weight": torch.randn(128, 4) * 0.3,
            f"diffusion_model.{name}.alpha": torch.tensor(4.0)}
    full = load_generator({k: v.clone() for k, v in state_dict.items()}, dtype="fp32", num_heads=1)
    original = full.get_submodule(name).weight.clone()
    merge_lora(full, lora)
    expected = full.get_submodule(name).weight
    assert (expected - original).norm() > 0.5 * original.norm()  # the LoRA changes the layer a lot
    fp8 = load_generator({k: v.clone() for k, v in state_dict.items()}, dtype="fp32", num_heads=1, fp8="e4m3fn")
    merge_lora(fp8, lora)
    merged = fp8.get_submodule(name).dequantised(torch.float32)
    assert (merged - expected).norm() / expected.norm() < 0.05
