"""The causal Wan model's three attention modes and its input checks."""
import pytest
import torch

from selfforcing_core.kv_cache import CacheRules
from selfforcing_core.model import ROPE_MAX_FRAMES, RopeTable, apply_rope, block_causal_mask, grid_positions
from selfforcing_core.rollout import NoiseSource, max_latent_frames, sample_video
from support.rounding import assert_float64_orders_agree
from support.tiny import tiny_model, tiny_prompt


def test_block_causal_equals_bidirectional_on_a_single_block_and_differs_on_more():
    model, prompt = tiny_model(), tiny_prompt()
    # a mask that allows everything and no mask may take two attention kernels: compared in float64
    model64, x64 = model.double(), torch.randn(1, 3, 16, 4, 4, dtype=torch.float64)
    t = torch.full((1, 3), 500.0)
    assert_float64_orders_agree(model64(x64, t, prompt.double(), mode="block_causal"),
                                model64(x64, t, prompt.double(), mode="bidirectional"))
    model = model.float()
    x, t = torch.randn(1, 6, 16, 4, 4), torch.full((1, 6), 500.0)
    causal = model(x, t, prompt, mode="block_causal")
    bidirectional = model(x, t, prompt, mode="bidirectional")
    # The first block cannot see the second in causal mode, so only the first block may differ... and must.
    assert not torch.allclose(causal[:, :3], bidirectional[:, :3], atol=1e-4)


def test_block_causal_first_block_ignores_later_frames():
    model, prompt = tiny_model(), tiny_prompt()
    x, t = torch.randn(1, 6, 16, 4, 4), torch.full((1, 6), 700.0)
    changed = x.clone()
    changed[:, 3:] = torch.randn_like(changed[:, 3:])
    model, prompt, x, changed = model.double(), prompt.double(), x.double(), changed.double()
    assert_float64_orders_agree(model(x, t, prompt, mode="block_causal")[:, :3],  # keys masked either way
                                model(changed, t, prompt, mode="block_causal")[:, :3])


def test_block_causal_mask_with_window():
    mask = block_causal_mask(frames=6, frame_seqlen=1, frames_per_block=3, window_frames=4, device="cpu")
    expected = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3 + [[0, 0, 1, 1, 1, 1]] * 3, dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_rope_rotates_adjacent_pairs_by_absolute_frame_position():
    table = RopeTable(head_dim=32)  # 16 pairs: 6 temporal, 5 height, 5 width
    assert [t.shape[1] for t in table.axis_angles] == [6, 5, 5]
    x = torch.zeros(1, 1, 1, 32)
    x[..., 0] = 1.0  # pair 0 = (1, 0): the first temporal frequency, angle = position * 1
    rotated = apply_rope(x, table.for_grid([5], 1, 1, "cpu"))
    torch.testing.assert_close(rotated[0, 0, 0, :2], torch.tensor([torch.cos(torch.tensor(5.0)),
                                                                      torch.sin(torch.tensor(5.0))]))
    assert torch.equal(rotated[..., 2:], x[..., 2:])


def test_the_last_block_a_stream_can_reach_fits_the_rope_table_and_the_next_does_not():
    table = RopeTable(head_dim=32)
    last = max_latent_frames(CacheRules(), None, frames_per_block=3)
    assert last % 3 == 0
    table.for_grid(range(last - 3, last), 1, 1, "cpu")
    with pytest.raises(ValueError, match="beyond the RoPE table"):
        table.for_grid(range(last, last + 3), 1, 1, "cpu")


def test_rope_equals_complex_float64_rotation_of_the_official_formula():
    table, head_dim = RopeTable(head_dim=128), 128
    frames, h, w = [4, 5, 6], 3, 5
    x = torch.randn(2, len(frames) * h * w, 2, head_dim)
    # Official: x as complex pairs times polar(1, angles) in complex128, angles cat over (t, h, w).
    time, height, width = table.axis_angles
    angles = torch.cat([time[frames].view(3, 1, 1, -1).expand(3, h, w, -1), height[:h].view(1, h, 1, -1).expand(3, h, w, -1),
                        width[:w].view(1, 1, w, -1).expand(3, h, w, -1)], dim=-1).reshape(-1, 1, head_dim // 2)
    expected = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * torch.polar(
        torch.ones_like(angles), angles)).flatten(-2)
    rotated = apply_rope(x, table.for_grid(frames, h, w, "cpu"))
    assert rotated.dtype == torch.float32
    # float32 rotation: each output is a two-term sum of products of |values| <= |x|, rounded a few times
    torch.testing.assert_close(rotated.double(), expected, atol=8 * 2.0 ** -24 * x.abs().max().item(), rtol=0)
    rotated64 = apply_rope(x.double(), table.for_grid(frames, h, w, "cpu", torch.float64))
    torch.testing.assert_close(rotated64, expected, atol=1e-12, rtol=0)


def test_rope_by_negative_positions_rotates_back():
    table = RopeTable(head_dim=32)
    positions = torch.tensor([[7, 2, 3], [300, 0, 1]])
    x = torch.randn(1, 2, 1, 32, dtype=torch.float64)
    there = apply_rope(x, table.cos_sin(positions, "cpu", torch.float64))
    torch.testing.assert_close(apply_rope(there, table.cos_sin(-positions, "cpu", torch.float64)), x)
    with pytest.raises(ValueError, match="beyond the table"):
        table.cos_sin(torch.tensor([[ROPE_MAX_FRAMES, 0, 0]]), "cpu")


def test_rope_grid_table_is_built_once_per_call_shape_and_shared_by_layers_and_calls():
    model, prompt = tiny_model(num_layers=3), tiny_prompt()
    built = []
    build = model.rope.cos_sin
    model.rope.cos_sin = lambda positions, device, dtype: built.append(positions) or build(positions, device, dtype)
    sample_video(model, prompt, 2, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(0)))
    # two blocks, each with 4 denoising calls and a clean-context call: one table per block
    assert [p[:, 0].unique().tolist() for p in built] == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(built[0], grid_positions([0, 1, 2], 2, 2))


def test_per_frame_timesteps_modulate_each_frame():
    model, prompt = tiny_model(), tiny_prompt()
    x = torch.randn(1, 3, 16, 4, 4)
    same = model(x, torch.full((1, 3), 500.0), prompt, mode="bidirectional")
    assert torch.equal(model(x, torch.tensor([500.0]), prompt, mode="bidirectional"), same)
    different = model(x, torch.tensor([[500.0, 500.0, 100.0]]), prompt, mode="bidirectional")
    assert not torch.allclose(different, same)


def test_prompt_padding_and_truncation_to_text_len():
    model = tiny_model()
    prompt = tiny_prompt(tokens=11)
    padded = torch.cat([prompt, torch.zeros(1, 5, 32)], dim=1)
    assert torch.equal(model.embed_text(prompt), model.embed_text(padded))  # the same padded rows
    longer = torch.cat([padded, torch.randn(1, 4, 32)], dim=1)  # rows past text_len are dropped
    assert torch.equal(model.embed_text(longer), model.embed_text(padded))


def test_bad_inputs_name_the_expected_shape():
    model, prompt = tiny_model(), tiny_prompt()
    with pytest.raises(ValueError, match=r"\[B, F, 16, H, W\]"):
        model(torch.randn(1, 16, 3, 4, 4), torch.zeros(1, 3), prompt, mode="bidirectional")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 16, 5, 4), torch.zeros(1, 3), prompt, mode="bidirectional")
    with pytest.raises(ValueError, match="umT5"):
        model(torch.randn(1, 3, 16, 4, 4), torch.zeros(1, 3), torch.randn(1, 4, 7), mode="bidirectional")
    with pytest.raises(ValueError, match="kv_cache"):
        model(torch.randn(1, 3, 16, 4, 4), torch.zeros(1, 3), prompt)
    with pytest.raises(ValueError, match="RoPE"):
        cache = model.new_kv_cache(4, 4, capacity_frames=3)
        model(torch.randn(1, 3, 16, 4, 4), torch.zeros(1, 3), prompt, kv_cache=cache, start_frame=1023)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_run_and_stay_close_to_fp32(dtype):
    """16-bit weights (what GPUs run) work end to end, including the affine cross-attention norm."""
    from selfforcing_core.rollout import NoiseSource, sample_video

    model, prompt = tiny_model(), tiny_prompt()
    reference = sample_video(model, prompt, 2, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(0)))
    half = sample_video(model.to(dtype), prompt, 2, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(0)))
    assert half.dtype == dtype
    error = (half.float() - reference).norm() / reference.norm()
    assert error < 0.1, f"relative error {error:.3f}"
