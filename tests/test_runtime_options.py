"""RuntimeOptions: validated bundle; load_with_options applies FP8 + offload and reports each."""
import pytest
import torch

from selfforcing_core.checkpoint import load_generator
from selfforcing_core.fp8 import FP8Linear
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import NoiseSource, sample_video
from selfforcing_core.runtime_options import RuntimeOptions, load_with_options
from support.tiny import TINY

LOAD = dict(dtype="fp32", num_heads=2, text_len=16)


@pytest.mark.parametrize("field, value, message", [
    ("fp8", "fp8", "fp8 must be 'off' or one of e4m3fn, e5m2"),
    ("fp8_granularity", "block", "fp8_granularity must be one of tensor, channel"),
    ("offload_blocks", -1, "offload_blocks must be >= 0"),
])
def test_bad_options_are_rejected_with_the_allowed_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        RuntimeOptions(**{field: value})


def test_load_with_options_equals_manual_fp8_load_and_reports_each_option():
    torch.manual_seed(0)
    state_dict = CausalWanModel(TINY).state_dict()
    options = RuntimeOptions(fp8="e4m3fn", fp8_granularity="channel", offload_blocks=1)
    model, report = load_with_options(state_dict, options, **LOAD)
    assert report[0].startswith("offload: 1/2 blocks") and report[1].startswith("FP8: 20 linear layers")
    assert isinstance(model.blocks[1].ffn[0], FP8Linear) and model.blocks[1].ffn[0].scale_weight.shape == (128, 1)
    manual = load_generator(state_dict, fp8="e4m3fn", fp8_granularity="channel", **LOAD)
    prompt = torch.randn(1, 5, 32)
    videos = [sample_video(m, prompt, 1, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(1)))
              for m in (model, manual)]
    assert torch.equal(*videos)


def test_loras_are_merged_before_fp8_compute_and_offload():
    from selfforcing_core.lora import merge_lora

    torch.manual_seed(0)
    state_dict = CausalWanModel(TINY).state_dict()
    name = "blocks.0.ffn.0"
    lora = {f"diffusion_model.{name}.lora_down.weight": torch.randn(2, 64),
            f"diffusion_model.{name}.lora_up.weight": torch.randn(128, 2) * 0.1}
    options = RuntimeOptions(fp8="e4m3fn", offload_blocks=1)
    model, report = load_with_options({k: v.clone() for k, v in state_dict.items()}, options,
                                      loras=[(lora, 0.5)], **LOAD)
    assert report[0] == "LoRA 1: 1 layers merged at strength 0.5"
    manual = load_generator({k: v.clone() for k, v in state_dict.items()}, fp8="e4m3fn", **LOAD)
    merge_lora(manual, lora, 0.5)
    prompt = torch.randn(1, 5, 32)
    videos = [sample_video(m, prompt, 1, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(1)))
              for m in (model, manual)]
    assert torch.equal(*videos)


def test_an_unmerged_lora_changes_strength_without_a_reload_and_equals_the_merged_one():
    """lora_mode unmerged: the LoRA stays beside the weights; scaling it gives what a merge at that
    strength gives (float32: up to rounding), and 0 gives the bare model bit for bit."""
    from selfforcing_core.runtime_options import scale_unmerged_loras

    torch.manual_seed(0)
    state_dict = CausalWanModel(TINY).state_dict()
    lora = {f"base_model.model.blocks.{block}.{name}.lora_A.weight": torch.randn(4, 64) * 0.1
            for block in (0, 1) for name in ("self_attn.q", "cross_attn.o")}
    lora.update({key.replace("lora_A", "lora_B"): torch.randn(64, 4) * 0.1 for key in lora})
    prompt = torch.randn(1, 5, 32)

    def video(model):
        return sample_video(model, prompt, 2, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(1)))

    model, report = load_with_options({k: v.clone() for k, v in state_dict.items()}, loras=[(lora, 0.8)],
                                      unmerged=True, **LOAD)
    assert "unmerged (no re-load to change it)" in report[0] and len(model.unmerged_loras) == 1
    for multiplier in (1.0, 0.5):
        merged, _ = load_with_options({k: v.clone() for k, v in state_dict.items()}, loras=[(lora, 0.8 * multiplier)],
                                      **LOAD)
        assert scale_unmerged_loras(model, multiplier) == f"unmerged LoRA at strength {0.8 * multiplier:g} (0.8 x {multiplier:g})"
        torch.testing.assert_close(video(model), video(merged), atol=1e-5, rtol=1e-5)
    scale_unmerged_loras(model, 0.0)
    assert torch.equal(video(model), video(load_generator(state_dict, **LOAD)))
    assert scale_unmerged_loras(merged, 2.0) == ""  # merged LoRAs are not scaled
    with pytest.raises(ValueError, match="2 given, one can stay unmerged"):
        load_with_options(state_dict, loras=[(lora, 1.0), (lora, 0.5)], unmerged=True, **LOAD)
