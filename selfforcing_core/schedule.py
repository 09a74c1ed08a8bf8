"""Few-step flow-matching schedule of Self Forcing (Wan's shifted flow matching, 1000-point grid).

Noise level sigma in [0, 1]: ``x_t = (1 - sigma) * x0 + sigma * noise``; timestep ``t = 1000 * sigma``.
The network predicts the flow ``v = noise - x0``. Every conversion looks sigma up at the grid
point nearest to ``t`` (the grid never reaches 0; its last point is t = 4.98 for shift 5).
"""
import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_STEPS = (1000, 750, 500, 250)  # positions on the unshifted sigma axis, warped below


class FlowMatchSchedule:
    """The shifted 1000-point sigma grid with nearest-grid lookups.

    ``shift`` 5.0 is what Self Forcing was trained and evaluated with; its real-time demo used 8.0.
    """

    def __init__(self, shift: float = 5.0):
        self.shift = shift
        unshifted = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
        self.sigmas = shift * unshifted / (1 + (shift - 1) * unshifted)  # [1000] float32
        self.timesteps = self.sigmas * NUM_TRAIN_TIMESTEPS

    def warp(self, steps=DEFAULT_STEPS) -> torch.Tensor:
        """Timesteps fed to the model for configured ``steps`` (1000 = pure noise).

        Each entry s becomes the grid timestep at index 1000 - s: shift 5 turns
        (1000, 750, 500, 250) into (1000, 937.5, 833.33, 625). Returns [len(steps)] float32.
        """
        steps = torch.as_tensor(steps, dtype=torch.long)
        if steps.numel() == 0 or (steps < 1).any() or (steps > NUM_TRAIN_TIMESTEPS).any():
            raise ValueError(f"denoising steps must lie in 1..{NUM_TRAIN_TIMESTEPS}, got {steps.tolist()}")
        return self.timesteps[NUM_TRAIN_TIMESTEPS - steps]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of the grid point nearest to each timestep. t: [N] -> [N] float32."""
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).to(self.timesteps.device)
        index = (self.timesteps[None, :] - t[:, None]).abs().argmin(dim=1)
        return self.sigmas[index]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) * x0 + sigma * noise`` per frame. x0, noise: [B, F, C, H, W]; t: [B, F]."""
        sigma = self.sigma(t.reshape(-1)).to(x0.device).view(*x0.shape[:2], 1, 1, 1)
        return ((1 - sigma) * x0 + sigma * noise).to(noise.dtype)

    def x0_from_flow(self, x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean estimate ``x_t - sigma * flow`` in float32 (float64 for float64 inputs), returned in
        flow's dtype. x_t, flow: [B, F, C, H, W]; t: [B, F]."""
        x_t, wide_flow = self.widen(x_t, flow)
        return (x_t - self.frame_sigmas(t, x_t) * wide_flow).to(flow.dtype)

    def flow_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Flow ``(x_t - x0) / sigma`` that maps x_t to x0, computed as ``x0_from_flow``. Shapes as there."""
        x_t, wide_x0 = self.widen(x_t, x0)
        return ((x_t - wide_x0) / self.frame_sigmas(t, x_t)).to(x0.dtype)

    @staticmethod
    def widen(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both in float32, or float64 if either is float64 (never float64 for lower inputs)."""
        dtype = torch.promote_types(torch.result_type(a, b), torch.float32)
        return a.to(dtype), b.to(dtype)

    def frame_sigmas(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-frame sigma [B, F, 1, 1, 1] of timesteps t [B, F], in like's dtype on its device."""
        return self.sigma(t.reshape(-1)).to(like.dtype).to(like.device).view(*like.shape[:2], 1, 1, 1)
