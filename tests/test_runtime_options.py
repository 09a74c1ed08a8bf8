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
