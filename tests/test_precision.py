"""Precision paths: no float64 on the compute device; the bf16 path's error against float32."""
import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from selfforcing_core import checkpoint
from selfforcing_core.clips import ClipBatchSource
from selfforcing_core.model import RopeTable, rope_tables, sinusoidal_embedding
from selfforcing_core.runtime_options import load_with_options
from selfforcing_core.rollout import NoiseSource, sample_video
from selfforcing_core.trainer import Trainer, TrainConfig
from support.tiny import tiny_model, tiny_prompt

# The host-side table builders: the only code allowed to make float64 tensors (on the CPU).
HOST_TABLE_CODE = {sinusoidal_embedding.__code__, rope_tables.__code__, RopeTable.cos_sin.__code__}


class NoFloat64(TorchDispatchMode):
    """Raises on any op whose output is a float64 tensor, unless a host table builder is on the stack.

    Counts the ops it saw and the float64 ops it allowed, so a test can show the mode was active.
    """

    def __init__(self, allowed_code=frozenset()):
        super().__init__()
        self.allowed_code, self.ops, self.allowed = allowed_code, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(out)):
            frame = sys._getframe()
            while frame is not None and frame.f_code not in self.allowed_code:
                frame = frame.f_back
            if frame is None:
                raise AssertionError(f"float64 produced on the compute device by {func}")
            self.allowed += 1
        return out


def test_the_mode_catches_float64_ops():
    with pytest.raises(AssertionError, match="float64 produced"):
        with NoFloat64(HOST_TABLE_CODE):
            torch.ones(3).double()
    with pytest.raises(AssertionError, match="float64 produced"):
        with NoFloat64(HOST_TABLE_CODE):
            torch.zeros(3, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_makes_float64_only_in_the_host_table_builders(dtype):
    model, prompt = tiny_model().to(dtype), tiny_prompt()
    run = lambda: sample_video(model, prompt, 2, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(0)))  # noqa: E731
    model.rope.memo.clear()
    expected = run()
    model.rope.memo.clear()
    with NoFloat64(HOST_TABLE_CODE) as mode:
        latents = run()
    assert torch.equal(latents, expected)
    assert mode.allowed > 0 and mode.ops > 1000  # the mode saw the whole rollout, tables included
    assert latents.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_makes_float64_only_in_the_host_table_builders(dtype):
    """One generator update (rollout with exit, critic and teacher scores, the DMD loss), one critic
    and one teacher-adapter update (flow matching), AdamW and the loss record, all under the mode."""
    g = torch.Generator().manual_seed(5)
    data = ClipBatchSource(latents=torch.randn(2, 6, 16, 4, 4, generator=g),
                           prompts=[torch.randn(5, 32, generator=g) for _ in range(2)],
                           negative=torch.randn(7, 32, generator=g))
    trainer = Trainer(tiny_model().to(dtype), data, TrainConfig(steps=1, batch_size=2, lora_rank=2))
    with NoFloat64(HOST_TABLE_CODE) as mode:
        record = trainer.train_step()
    assert all(math.isfinite(record[name]) for name in ("generator", "critic", "real"))
    assert mode.ops > 1000


def test_rope_tables_reach_the_device_without_float64():
    # On the meta device (standing in for MPS) no float64 may appear at all: tables cross in float32.
    class NoFloat64OnMeta(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "meta" and t.dtype == torch.float64:
                    raise AssertionError(f"float64 on the device from {func}")
            return out

    with NoFloat64OnMeta():
        cos, sin = RopeTable(128).for_grid([0, 1, 2], 4, 5, "meta")
        features = sinusoidal_embedding(torch.tensor([500.0, 250.0]), 256).float().to("meta")
    assert cos.device.type == sin.device.type == features.device.type == "meta"
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (60, 1, 128)
    with pytest.raises(AssertionError, match="float64 on the device"):
        with NoFloat64OnMeta():
            torch.ones(2, dtype=torch.float64, device="meta")


@pytest.mark.parametrize("flags, amx, avx512_bf16, expected", [
    ({"avx512f", "amx_bf16", "amx_tile"}, False, False, "AMX-BF16"),
    ({"avx512f", "avx512_bf16"}, False, False, "AVX512-BF16"),
    (set(), False, True, "AVX512-BF16"),  # torch's own probe, where /proc/cpuinfo is missing
    ({"avx512f", "avx2"}, False, False, None),
])
def test_auto_dtype_is_bf16_on_cpus_with_bf16_matrix_instructions(monkeypatch, flags, amx, avx512_bf16, expected):
    monkeypatch.delenv("SELFFORCING_CPU_BF16")
    monkeypatch.setattr(checkpoint, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert checkpoint.cpu_bf16_matrix_units() == expected
    state_dict = tiny_model().state_dict()
    model, report = load_with_options(state_dict, dtype="auto", device="cpu", num_heads=2, text_len=16)
    assert model.patch_embedding.weight.dtype == (torch.bfloat16 if expected else torch.float32)
    assert report[0] == (f"dtype auto: bfloat16 (CPU bf16 matrix instructions: {expected})" if expected else
                         "dtype auto: float32, the file's precision (the CPU has no bf16 matrix instructions)")
    _, explicit = load_with_options(state_dict, dtype="fp32", device="cpu", num_heads=2, text_len=16)
    assert not any(line.startswith("dtype auto") for line in explicit)


def test_bf16_rollout_keeps_norms_in_float32_and_runs_linears_in_bf16():
    model, prompt = tiny_model().bfloat16(), tiny_prompt()

    class OpDtypes(TorchDispatchMode):
        seen: dict = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("native_layer_norm", "rsqrt", "_scaled_dot_product_flash_attention_for_cpu"):
                self.seen.setdefault(name, set()).add(args[0].dtype)
            if name in ("addmm", "onednn_linear"):  # the BLAS and the oneDNN linear (linear.py)
                self.seen.setdefault("linear", set()).update((args[1].dtype, args[2].dtype) if name == "addmm"
                                                             else (args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    with OpDtypes() as mode:
        sample_video(model, prompt, 1, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(0)))
    assert mode.seen["native_layer_norm"] == {torch.float32}
    assert mode.seen["rsqrt"] == {torch.float32}  # rms_norm, decomposed under a dispatch mode
    assert mode.seen["linear"] == {torch.bfloat16}
    # the CPU attention kernel takes bf16 q, k, v and runs its softmax in float32
    assert mode.seen["_scaled_dot_product_flash_attention_for_cpu"] == {torch.bfloat16}


def test_bf16_rollout_error_against_float32_is_a_few_bf16_roundings():
    """bf16 keeps 8 significand bits: unit roundoff u = 2^-8. The latents are stored in bf16 (one
    rounding, up to u each) and every model call's flow carries the roundings of its bf16
    activations, damped by the float32 norms; with norms, modulation, timestep features, RoPE and
    softmax in float32 the whole error stays a small multiple of u. A float quantity computed in
    bf16 instead (RoPE angles up to 1000, timesteps near 1000) costs whole units of relative error."""
    unit_roundoff = 2.0 ** -8
    prompt = tiny_prompt()
    for seed in range(2):
        reference = sample_video(tiny_model(seed), prompt, 3, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(seed)))
        latents = sample_video(tiny_model(seed).bfloat16(), prompt, 3, (16, 4, 4),
                               noise=NoiseSource(torch.Generator().manual_seed(seed)))
        assert latents.dtype == torch.bfloat16
        error = ((latents.float() - reference).norm() / reference.norm()).item()
        assert 0 < error < 4 * unit_roundoff
