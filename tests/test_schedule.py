"""Few-step flow-matching schedule: warped step lists, nearest-grid sigma, x0 <-> flow conversions."""
import pytest
import torch

from selfforcing_core.schedule import FlowMatchSchedule


@pytest.mark.parametrize("shift,expected", [
    (5.0, [1000.0, 937.5, 833.3333, 625.0]),  # inference.py / training (SPEC 4.2)
    (8.0, [1000.0, 960.0, 888.8889, 727.2727]),  # the official real-time demo
])
def test_warped_step_list_matches_the_official_values(shift, expected):
    torch.testing.assert_close(FlowMatchSchedule(shift).warp(), torch.tensor(expected), atol=1e-3, rtol=0)


def test_grid_is_the_shifted_linspace_and_never_reaches_zero():
    schedule = FlowMatchSchedule(5.0)
    s = 1 - torch.arange(1000, dtype=torch.float64) / 1000
    torch.testing.assert_close(schedule.sigmas.double(), 5 * s / (1 + 4 * s), atol=1e-6, rtol=0)
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
    torch.testing.assert_close(schedule.x0_from_flow(x_t, flow, t), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(schedule.flow_from_x0(x_t, x0, t), flow, atol=1e-4, rtol=1e-4)


def test_invalid_step_lists_are_rejected():
    with pytest.raises(ValueError, match="1..1000"):
        FlowMatchSchedule(5.0).warp([1000, 0])
