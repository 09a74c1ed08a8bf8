"""Self-rollout DMD: the generator's rollout with an exit step, and the three training losses.

One frozen base model serves all three roles through LoRA adapters (``lora.py``):

* generator = base + ``"generator"`` adapter, causal with the KV cache (``rollout_with_exit``);
* fake score (critic) = base + ``"fake"`` adapter, bidirectional, trained with ``flow_matching_loss``
  on generator rollouts;
* real score (teacher) = base + ``"real"`` adapter at strength ``real_lora_weight``, bidirectional,
  with classifier-free guidance ``cond + g (cond - uncond)``; the real adapter is trained with
  ``flow_matching_loss`` on the user's clip latents (weight 0 = plain distillation of the base).

Latents are generator latents [B, F, C, H, W]; timesteps are float (0..1000), one per sample.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .lora import active_adapter
from .model import CausalWanModel
from .rollout import NoiseSource, denoise_block, write_clean_context
from .schedule import NUM_TRAIN_TIMESTEPS, FlowMatchSchedule

GENERATOR, FAKE, REAL = "generator", "fake", "real"


def autocast(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class CachedContextSnapshot:
    """Stands in for the KV cache in one checkpointed cached call of one layer.

    The first ``store`` (the forward pass) writes the new keys/values into the real cache and copies
    the cached context around them; the recomputation in the backward pass attends to that copy
    instead of the cache, which has moved on by then. The copy holds what attention keeps for
    backward anyway without checkpointing (the concatenated keys/values), so memory still drops
    by the block's other activations.
    """

    def __init__(self, kv_cache):
        self.kv_cache, self.context = kv_cache, None
        self.plan = kv_cache.plan  # the forward pass's plan; the cache's own moves on before backward
        self.rules = kv_cache.rules

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, rotate) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, new tokens, heads, head_dim] -> keys, values [B, valid tokens, heads, head_dim] (see KVCache.store)."""
        cache, plan = self.kv_cache, self.plan
        fs = cache.frame_seqlen
        lo, hi = plan.written_tokens(fs)
        if self.context is None:
            cache.store(layer, k.detach(), v.detach(), rotate)  # the real write (with any eviction), done once
            end = plan.valid_frames * fs
            self.context = [(buffer[:, :lo].clone(), buffer[:, hi:end].clone())
                            for buffer in (cache.attended_keys(layer), cache.v[layer])]
        (k_before, k_after), (v_before, v_after) = self.context
        skip = plan.skipped_frames * fs
        keys = k if cache.k_rotated is None else rotate(k, plan.position)
        return (torch.cat([k_before, keys[:, skip:].to(k_before.dtype), k_after], dim=1),
                torch.cat([v_before, v[:, skip:].to(v_before.dtype), v_after], dim=1))


def enable_gradient_checkpointing(model: CausalWanModel):
    """Recompute each transformer block in the backward pass of every call run with gradients.

    Cached calls (the generator's exit step) attend, in the recomputation, to a copy of the
    context they saw in the forward pass (``CachedContextSnapshot``). The backward pass must run
    with the same adapter active as the forward pass.
    """
    for block in model.blocks:
        block.wrap_forward("checkpoint", checkpointed_forward)


def checkpointed_forward(inner, *args):
    """A block's ``checkpoint`` forward wrapper: ``inner(*args)``, recomputed in the backward pass."""
    if not torch.is_grad_enabled():
        return inner(*args)
    args[2]()  # embed the prompt once, outside the recomputed region
    kv_cache = args[7]
    if kv_cache is not None:
        args = (*args[:7], CachedContextSnapshot(kv_cache), *args[8:])
    return checkpoint(inner, *args, use_reentrant=False)


def disable_gradient_checkpointing(model: CausalWanModel):
    """Undo ``enable_gradient_checkpointing`` (other forward wrappers, such as compile, stay)."""
    for block in model.blocks:
        block.wrap_forward("checkpoint", None)


def dmd_timesteps(batch: int, generator: torch.Generator, shift: float = 5.0,
                  min_t: float = 20.0, max_t: float = 980.0) -> torch.Tensor:
    """DMD noise levels: integer t ~ U{0..999}, shifted like the schedule, clamped. -> [batch] float32."""
    u = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator).float() / NUM_TRAIN_TIMESTEPS
    return (NUM_TRAIN_TIMESTEPS * shift * u / (1 + (shift - 1) * u)).clamp(min_t, max_t)


def rollout_with_exit(model: CausalWanModel, prompt: torch.Tensor, noise: NoiseSource, num_blocks: int,
                      latent_shape: tuple[int, int, int], schedule: FlowMatchSchedule, timesteps: torch.Tensor,
                      exit_step: int, frames_per_block: int = 3, batch_size: int = 1) -> torch.Tensor:
    """Generate a clip block by block as at inference, stopping every block at ``exit_step``.

    Steps before ``exit_step`` run without gradients; the exit step runs with gradients (when
    enabled by the caller) and its x0 is the block's output. The cached context (earlier blocks'
    clean pass) is written without gradients. prompt: [B, L, text_dim]. -> [B, F, C, H, W].
    """
    if not 0 <= exit_step < len(timesteps):
        raise ValueError(f"exit step {exit_step} outside 0..{len(timesteps) - 1}")
    channels, height, width = latent_shape
    dtype, device = model.dtype, model.device
    kv_cache = model.new_kv_cache(height, width, num_blocks * frames_per_block, batch_size=batch_size)
    grad = torch.is_grad_enabled()
    blocks = []
    for block in range(num_blocks):
        start = block * frames_per_block
        shape = (batch_size, frames_per_block, channels, height, width)

        def step_noise(step, block=block):
            return noise.step_noise(block, step, shape, dtype, device)
        x = noise.block_noise(block, start, shape, dtype, device)
        t_exit = torch.full(shape[:2], float(timesteps[exit_step]), device=device)
        with torch.no_grad(), autocast(device):
            if exit_step > 0:
                x0 = denoise_block(model, schedule, timesteps[:exit_step], x, prompt, kv_cache, start, step_noise)
                x = schedule.add_noise(x0, step_noise(exit_step - 1), t_exit)
        with torch.set_grad_enabled(grad), autocast(device):
            flow = model(x, t_exit, prompt, kv_cache=kv_cache, start_frame=start)
        x0 = schedule.x0_from_flow(x, flow.float(), t_exit)
        if block + 1 < num_blocks:  # clean-context pass for the next block (not needed after the last)
            with torch.no_grad(), autocast(device):
                write_clean_context(model, x0.detach().to(dtype), prompt, kv_cache, start)
        blocks.append(x0)
    return torch.cat(blocks, dim=1)


def predict_flow(model: CausalWanModel, x_t: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Bidirectional flow prediction with the currently active adapter. x_t [B, F, C, H, W], t [B] -> float32 like x_t."""
    with autocast(x_t.device):
        flow = model(x_t, t, prompt, mode="bidirectional")
    return flow.float()


def predict_x0(model, schedule: FlowMatchSchedule, x_t, t, prompt) -> torch.Tensor:
    t_frames = t[:, None].expand(x_t.shape[:2])
    return schedule.x0_from_flow(x_t, predict_flow(model, x_t, t, prompt), t_frames)


def real_score(model, schedule, x_t, t, prompt, negative, guidance_scale: float, real_lora_weight: float):
    """Teacher x0 with CFG ``cond + g (cond - uncond)``; teacher = base + real adapter at ``real_lora_weight``."""
    with active_adapter(model, REAL if real_lora_weight else None, strength=real_lora_weight or None):
        cond = predict_x0(model, schedule, x_t, t, prompt)
        uncond = predict_x0(model, schedule, x_t, t, negative)
    return cond + guidance_scale * (cond - uncond)


def dmd_generator_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD loss whose gradient w.r.t. x is ``(x0_fake - x0_real) / mean|x - x0_real| / numel``.

    x: generator output [B, F, C, H, W] (with grad); x0_real, x0_fake: score predictions on its
    noised copy (no grad). Normaliser per sample over frames, channels, pixels; NaNs zeroed.
    The official ``0.5 mse(x, x - direction)`` is formed in float64 to keep ``x - (x - direction)``
    exact; here the value ``0.5 mean(direction^2)`` and the gradient ``direction / numel`` are
    formed directly in float32, with no cancellation and no float64 tensor (MPS has none).
    """
    with torch.no_grad():
        normaliser = (x.float() - x0_real.float()).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        direction = torch.nan_to_num((x0_fake.float() - x0_real.float()) / normaliser)
    moved = x.float() - x.detach().float()  # zero, with gradient 1 w.r.t. x
    return 0.5 * direction.square().mean() + (moved * direction).sum() / x.numel()


def flow_matching_loss(model, schedule: FlowMatchSchedule, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       prompt: torch.Tensor) -> torch.Tensor:
    """Denoising loss ``mean((v_pred - (noise - x))^2)`` of the active adapter at timesteps t [B].

    (The official critic converts x0 back to flow before comparing; that round trip is the identity.)
    """
    t_frames = t[:, None].expand(x.shape[:2])
    x_t = schedule.add_noise(x, noise, t_frames)
    return F.mse_loss(predict_flow(model, x_t, t, prompt), (noise - x).float())


def critic_and_real_inputs(model, schedule, x, noise, t, prompt, negative, guidance_scale, real_lora_weight):
    """Noise a rollout and get (x0_real, x0_fake) for the DMD loss, without gradients."""
    t_frames = t[:, None].expand(x.shape[:2])
    with torch.no_grad():
        x_t = schedule.add_noise(x.detach(), noise, t_frames)
        x0_real = real_score(model, schedule, x_t, t, prompt, negative, guidance_scale, real_lora_weight)
        with active_adapter(model, FAKE):
            x0_fake = predict_x0(model, schedule, x_t, t, prompt)
    return x0_real, x0_fake
