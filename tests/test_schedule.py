"""Few-step flow-matching schedule: warped step lists, nearest-grid sigma, x0 <-> flow conversions."""
import pytest
import torch

from selfforcing_core.schedule import FlowMatchSchedule
from support.rounding import assert_within_roundings


@pytest.mark.parametrize("shift,expected", [
    (5.0, [1000.0, 937.5, 833.3333, 625.0]),  # inference.py / training (SPEC 4.2)
    (8.0, [1000.0, 960.0, 888.8889, 727.2727]),  # the official real-time demo
])
def test_warped_step_list_matches_the_official_values(shift, expected):
    torch.testing.assert_close(FlowMatchSchedule(shift).warp(), torch.tensor(expected), atol=1e-3, rtol=0)


def test_grid_is_the_shifted_linspace_and_never_reaches_zero():
    schedule = FlowMatchSchedule(5.0)
    s = 1 - torch.arange(1000, dtype=torch.float64) / 1000
    assert_within_roundings(schedule.sigmas, 5 * s / (1 + 4 * s), 1.0, 4)  # 4 float32 operations on values <= 1
    assert schedule.timesteps[-1] > 4.9


def test_sigma_is_looked_up_at_the_nearest_grid_point():
    schedule = FlowMatchSchedule(5.0)
    t = torch.tensor([1000.0, 937.4, 0.0, 4.98])
    index = (schedule.timesteps[None] - t[:, None]).abs().argmin(1)
    assert torch.equal(schedule.sigma(t), schedule.sigmas[index])
    assert schedule.sigma(torch.tensor([0.0])).item() == schedule.sigmas[-1].item()


def test_x0_and_flow_conversions_invert_each_other():
    schedule = FlowMatchSchedule(5.0)
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    t = schedule.warp()[1].expand(2, 3)
    x_t = schedule.add_noise(x0, noise, t)
    flow = noise - x0  # the model's target
    sigma = schedule.sigma(t).view(2, 3, 1, 1, 1)
    magnitude = x0.abs() + noise.abs() + x_t.abs()  # 3 operations to x_t, 3 back; flow divides by sigma
    assert_within_roundings(schedule.x0_from_flow(x_t, flow, t), x0, magnitude, 6)
    assert_within_roundings(schedule.flow_from_x0(x_t, x0, t), flow, magnitude / sigma, 6)


def test_invalid_step_lists_are_rejected():
    with pytest.raises(ValueError, match="1..1000"):
        FlowMatchSchedule(5.0).warp([1000, 0])
