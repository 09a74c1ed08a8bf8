"""Self-rollout with an exit step and the DMD / flow-matching losses."""
import pytest
import torch

from selfforcing_core import dmd
from selfforcing_core.linear import cpu_kernel
from selfforcing_core.lora import active_adapter, adapter_parameters, inject_lora
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import NoiseSource, StreamSettings, sample_video
from selfforcing_core.schedule import FlowMatchSchedule
from support.rounding import assert_within_roundings
from support.tiny import TINY

SHAPE = (16, 4, 4)


def adapted_model():
    torch.manual_seed(0)
    model = CausalWanModel(TINY).requires_grad_(False)
    for name in (dmd.GENERATOR, dmd.FAKE, dmd.REAL):
        inject_lora(model, name, rank=4)
        for p in adapter_parameters(model, name).values():
            p.requires_grad_(True)
            with torch.no_grad():
                p.normal_(0, 0.05)
    return model


def explicit_noise(batch=2, blocks=2, steps=4):
    g = torch.Generator().manual_seed(3)
    return NoiseSource(initial=torch.randn(batch, 3 * blocks, *SHAPE, generator=g),
                       renoise=torch.randn(blocks, steps - 1, batch, 3, *SHAPE, generator=g))


@pytest.mark.parametrize("exit_step", [0, 1, 2, 3])
def test_rollout_with_exit_equals_inference_stopped_at_that_step(exit_step):
    model, schedule = adapted_model(), FlowMatchSchedule(5.0)
    timesteps, prompt = schedule.warp(), torch.randn(2, 5, 32)
    with torch.no_grad(), active_adapter(model, dmd.GENERATOR):
        ours = dmd.rollout_with_exit(model, prompt, explicit_noise(), 2, SHAPE, schedule, timesteps, exit_step,
                                     batch_size=2)
        inference = sample_video(model, prompt, 2, SHAPE, noise=explicit_noise(), batch_size=2,
                                 settings=StreamSettings(timesteps=timesteps[:exit_step + 1]))
    torch.testing.assert_close(ours, inference, atol=0, rtol=0)  # the same calls on the same shapes


def test_gradients_reach_only_the_exit_step_and_only_the_generator_adapter():
    model, schedule = adapted_model(), FlowMatchSchedule(5.0)
    timesteps, prompt = schedule.warp(), torch.randn(2, 5, 32)
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        (torch.is_grad_enabled(), float(args[1].flatten()[0]), kwargs["start_frame"])), with_kwargs=True)
    with active_adapter(model, dmd.GENERATOR):
        x = dmd.rollout_with_exit(model, prompt, explicit_noise(), 2, SHAPE, schedule, timesteps, 2, batch_size=2)
    with_grad = [(t, start) for grad, t, start in calls if grad]
    assert with_grad == [(float(timesteps[2]), 0), (float(timesteps[2]), 3)]
    assert len(calls) == 2 * 3 + 1  # 3 steps per block, one clean-context pass between the blocks
    x.square().sum().backward()
    generator = adapter_parameters(model, dmd.GENERATOR).values()
    assert all(p.grad is not None for p in generator) and any(p.grad.abs().sum() > 0 for p in generator)
    for name in (dmd.FAKE, dmd.REAL):
        assert all(p.grad is None for p in adapter_parameters(model, name).values())
    base = [p for n, p in model.named_parameters() if ".down." not in n and ".up." not in n]
    assert len(base) == len(list(CausalWanModel(TINY).parameters()))
    assert all(p.grad is None for p in base)


def test_cached_context_is_detached_from_earlier_blocks():
    """The gradient of block 1's output equals the one obtained with block 0 computed without gradients."""
    schedule = FlowMatchSchedule(5.0)
    prompt = torch.randn(2, 5, 32)

    def block1_grads(block0_no_grad):
        model = adapted_model()
        if block0_no_grad:
            plain = model.forward

            def forward(*args, **kwargs):
                with torch.set_grad_enabled(torch.is_grad_enabled() and kwargs.get("start_frame", 0) != 0):
                    return plain(*args, **kwargs)
            model.forward = forward
        with active_adapter(model, dmd.GENERATOR):
            x = dmd.rollout_with_exit(model, prompt, explicit_noise(), 2, SHAPE, schedule, schedule.warp(), 1,
                                      batch_size=2)
        params = list(adapter_parameters(model, dmd.GENERATOR).values())
        return torch.autograd.grad(x[:, 3:].square().sum(), params)

    with cpu_kernel("blas"):  # one linear kernel with and without gradients: only the graphs may differ
        pairs = list(zip(block1_grads(False), block1_grads(True)))
    for ours, reference in pairs:
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)  # the same block-1 graph either way


def test_dmd_loss_equals_the_official_float64_form_without_float64():
    """Value 0.5 mse(x, x - direction) and gradient direction / numel, against the official form
    computed in float64; ours runs in float32. Bound: a float32 sum of n terms is within n * eps32
    (relative) of the exact one, and the normaliser is a mean over one sample's elements."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, *SHAPE, generator=g, requires_grad=True)
    x0_real, x0_fake = torch.randn(2, 6, *SHAPE, generator=g), torch.randn(2, 6, *SHAPE, generator=g)
    loss = dmd.dmd_generator_loss(x, x0_real, x0_fake)
    assert loss.dtype == torch.float32
    loss.backward()

    x64 = x.detach().double().requires_grad_(True)
    normaliser = (x64 - x0_real.double()).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    direction = (x0_fake.double() - x0_real.double()) / normaliser
    official = 0.5 * torch.nn.functional.mse_loss(x64, (x64 - direction).detach())
    official.backward()
    eps32 = torch.finfo(torch.float32).eps
    per_sample = x[0].numel()
    torch.testing.assert_close(loss.double(), official.detach(), rtol=(x.numel() + per_sample + 4) * eps32, atol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=(per_sample + 4) * eps32, atol=0)


def test_dmd_timesteps_are_shifted_integers_within_the_clamp():
    t = dmd.dmd_timesteps(20000, torch.Generator().manual_seed(0), shift=5.0)
    assert t.min() == 20.0 and t.max() == 980.0
    u = (t / 1000) / (5 - 4 * t / 1000)  # inverse of the shift
    inside = (t > 20) & (t < 980)
    torch.testing.assert_close(u[inside] * 1000, (u[inside] * 1000).round(), atol=2e-3, rtol=0)
    assert (t[inside] > 500).float().mean() > 0.7  # shift 5 puts most mass at high noise


def test_real_score_uses_guidance_against_the_negative_prompt_and_the_real_adapter():
    model, schedule = adapted_model(), FlowMatchSchedule(5.0)
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(2, 3, *SHAPE, generator=g), torch.tensor([300.0, 700.0])
    prompt, negative = torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        with active_adapter(model, dmd.REAL, strength=0.5):
            cond = dmd.predict_x0(model, schedule, x_t, t, prompt)
            uncond = dmd.predict_x0(model, schedule, x_t, t, negative)
        guided = dmd.real_score(model, schedule, x_t, t, prompt, negative, 3.0, 0.5)
        plain = dmd.real_score(model, schedule, x_t, t, prompt, negative, 0.0, 0.0)
        base = dmd.predict_x0(model, schedule, x_t, t, prompt)
    assert_within_roundings(guided, 4 * cond - 3 * uncond, 4 * cond.abs() + 3 * uncond.abs(), 3)  # 3 operations each
    torch.testing.assert_close(plain, base, atol=0, rtol=0)
    assert not torch.allclose(cond, base)


def test_flow_matching_loss_is_zero_for_a_perfect_flow_predictor():
    """With the model replaced by the exact flow noise - x, the loss vanishes (the target is right)."""
    schedule = FlowMatchSchedule(5.0)
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(2, 3, *SHAPE, generator=g), torch.randn(2, 3, *SHAPE, generator=g)

    class ExactFlow(torch.nn.Module):
        def forward(self, x_t, t, prompt, mode):
            return noise - x
    loss = dmd.flow_matching_loss(ExactFlow(), schedule, x, noise, torch.tensor([100.0, 900.0]), None)
    assert loss == 0


@pytest.mark.parametrize("trained", ["adapter", "full"])
def test_checkpointed_exit_step_gives_the_same_gradients_and_cache(trained):
    """Recomputing the exit step in backward (against a copy of its cached context) changes nothing:
    the gradients of the trained weights and the KV cache left by the rollout equal the plain run's."""
    schedule, prompt = FlowMatchSchedule(5.0), torch.randn(2, 5, 32)

    def run(checkpointing):
        model = adapted_model()
        params = list(adapter_parameters(model, dmd.GENERATOR).values())
        if trained == "full":
            params = [p for n, p in model.named_parameters() if ".down." not in n and ".up." not in n]
            for p in params:
                p.requires_grad_(True)
        if checkpointing:
            dmd.enable_gradient_checkpointing(model)
        caches, new_cache, grad_calls = [], model.new_kv_cache, []
        model.new_kv_cache = lambda *args, **kwargs: caches.append(new_cache(*args, **kwargs)) or caches[-1]
        model.blocks[0].ffn.register_forward_hook(lambda *_: grad_calls.append(torch.is_grad_enabled()))
        with active_adapter(model, dmd.GENERATOR):
            x = dmd.rollout_with_exit(model, prompt, explicit_noise(blocks=3), 3, SHAPE, schedule, schedule.warp(), 1,
                                      batch_size=2)
            grads = torch.autograd.grad(x.square().sum(), params)
        return x, grads, caches[0], sum(grad_calls)

    x, grads, cache, grad_calls = run(False)
    x_ckpt, grads_ckpt, cache_ckpt, grad_calls_ckpt = run(True)
    assert grad_calls_ckpt == 2 * grad_calls == 6  # each block's exit step ran again in backward
    torch.testing.assert_close(x_ckpt, x, atol=0, rtol=0)
    for ours, reference in zip(grads_ckpt, grads):  # the recomputation repeats the same operations
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    assert cache_ckpt.slot_frames == cache.slot_frames == list(range(9))
    assert torch.equal(cache_ckpt.k, cache.k) and torch.equal(cache_ckpt.v, cache.v)
