"""Block offload: same outputs as a resident model, blocks streamed in once per call and released."""
from dataclasses import replace

import pytest
import torch

from selfforcing_core.checkpoint import load_generator
from selfforcing_core.model import CausalWanModel
from selfforcing_core.offload import offload_blocks
from selfforcing_core.rollout import NoiseSource, StreamSettings, sample_video
from support.tiny import TINY

THREE_BLOCKS = replace(TINY, num_layers=3)
PROMPT = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))


def tiny_model(fp8="off"):
    torch.manual_seed(0)
    return load_generator(CausalWanModel(THREE_BLOCKS).state_dict(), dtype="fp32", num_heads=2, text_len=16, fp8=fp8)


def rollout(model):
    return sample_video(model, PROMPT, 2, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(1)),
                        settings=StreamSettings(kv_window_frames=3 * 2))


@pytest.mark.parametrize("fp8", ["off", "e4m3fn"])
def test_offloaded_rollout_equals_resident_rollout(fp8):
    resident = rollout(tiny_model(fp8))
    model = tiny_model(fp8)
    report = offload_blocks(model, 2, "cpu")
    assert "2/3 blocks kept on the CPU" in report
    assert torch.equal(rollout(model), resident)
    calls = 2 * (4 + 1)  # 4 denoising steps + 1 clean-context pass per block
    assert [getattr(b, "offload", None) and b.offload.load_count for b in model.blocks] == [calls, calls, None]


def test_offloaded_block_holds_only_its_host_copies_between_calls():
    model = tiny_model("e4m3fn")
    offload_blocks(model, 1, "cpu")
    rollout(model)
    block = model.blocks[0]
    tensors = [*block.parameters(), *block.buffers()]
    assert len(tensors) == len(block.offload.host)
    assert all(t.data_ptr() == host.data_ptr() for t, host in zip(tensors, block.offload.host))
    assert block.ffn[0].weight.dtype == torch.float8_e4m3fn  # offload keeps storage dtypes


def test_offloading_again_replaces_hooks_instead_of_stacking_them():
    model = tiny_model()
    offload_blocks(model, 2, "cpu")
    offload_blocks(model, 1, "cpu")
    x, t = torch.randn(1, 3, 16, 4, 4), torch.full((1, 3), 500.0)
    model(x, t, PROMPT, mode="bidirectional")
    assert model.blocks[0].offload.load_count == 1
    assert model.blocks[1].offload is None
    assert len(model.blocks[1]._forward_pre_hooks) == 0


def test_offload_count_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"offload_blocks must be in 0\.\.3"):
        offload_blocks(tiny_model(), 4, "cpu")
