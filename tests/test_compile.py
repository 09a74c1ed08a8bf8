"""torch.compile of the blocks: same outputs as eager, no recompiles once a rolling stream is warm,
and a single warning with an eager fall back when compilation fails."""
import warnings

import pytest
import torch

import selfforcing_core.compile as compile_module
from selfforcing_core.compile import compile_blocks, compile_failed, compiled_graph_count, compiler_works
from selfforcing_core.model import CausalWanModel
from selfforcing_core.rollout import NoiseSource, StreamSettings, stream_blocks
from support.rounding import assert_within_float32_reductions, wan_forward_reductions
from support.tiny import TINY

PROMPT = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))


def tiny_model():
    torch.manual_seed(0)
    return CausalWanModel(TINY).eval().requires_grad_(False)


def stream(model, num_blocks, after_block=None):
    """Rolling-window rollout (window 6 frames = 2 blocks); returns all frames [1, F, C, H, W]."""
    blocks = stream_blocks(model, PROMPT, num_blocks, (16, 4, 4), noise=NoiseSource(torch.Generator().manual_seed(1)),
                           callback=after_block, settings=StreamSettings(kv_window_frames=6))
    return torch.cat(list(blocks), dim=1)


def use_compiler(monkeypatch, compile_fn):
    """Stand ``compile_fn`` in for torch.compile, with the compiler probe passing."""
    monkeypatch.setattr(compile_module, "compiler_works", lambda device: None)
    monkeypatch.setattr(torch, "compile", compile_fn)


@pytest.mark.slow
def test_compiled_stream_matches_eager_and_stops_recompiling():
    if (reason := compiler_works("cpu")) is not None:
        pytest.skip(f"torch.compile does not work here: {reason}")
    eager = stream(tiny_model(), 6)
    model = tiny_model()
    assert "2 blocks compiled" in compile_blocks(model, "cpu")
    graphs_before = compiled_graph_count()
    graphs_after_block = []
    compiled = stream(model, 6, after_block=lambda info: graphs_after_block.append(compiled_graph_count()))
    assert compile_failed(model) is None
    assert graphs_after_block[0] > graphs_before  # really compiled
    # the window is full from block 2 on: every later block reuses the same graphs
    assert graphs_after_block[2:] == [graphs_after_block[2]] * 4
    # compiled kernels reorder reductions: each of the 6 x (4 steps + 1 cache write) model calls in
    # sequence is one forward's worth of float32 rounding
    length, depth = wan_forward_reductions(TINY, tokens=(6 + 3) * 4)  # attention over the 6-frame window and the block, 4 tokens a frame
    assert_within_float32_reductions(compiled, eager, length, depth * 6 * 5)


def test_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: C compiler not found")
        return run
    use_compiler(monkeypatch, broken_compile)
    eager = stream(tiny_model(), 2)
    model = tiny_model()
    compile_blocks(model, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = stream(model, 2)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "C compiler not found" in messages[0] and "eagerly" in messages[0]
    assert "C compiler not found" in compile_failed(model)
    assert torch.equal(result, eager)


def test_unavailable_compiler_leaves_the_model_eager(monkeypatch):
    monkeypatch.setattr(compile_module, "compiler_works", lambda device: "RuntimeError: no triton")
    model = tiny_model()
    with pytest.warns(RuntimeWarning, match="no triton"):
        report = compile_blocks(model, "cpu")
    assert "unavailable" in report and "no triton" in report
    assert all(not block.forward_wrappers for block in model.blocks)
    assert torch.equal(stream(model, 1), stream(tiny_model(), 1))


def test_gradient_checkpointing_on_and_off_leaves_the_compiled_forward_in_place(monkeypatch):
    """Compile, then enable and disable gradient checkpointing: the blocks still run compiled
    (one wrapping mechanism; turning one wrapper off never drops another)."""
    from selfforcing_core import dmd
    compiled_calls = []

    def counting_compile(fn, **kwargs):
        def run(*args):
            compiled_calls.append(fn)
            return fn(*args)
        return run
    use_compiler(monkeypatch, counting_compile)
    eager = stream(tiny_model(), 1)
    model = tiny_model()
    compile_blocks(model, "cpu")
    dmd.enable_gradient_checkpointing(model)
    assert all(list(block.forward_wrappers) == ["compile", "checkpoint"] for block in model.blocks)
    dmd.disable_gradient_checkpointing(model)
    assert all(list(block.forward_wrappers) == ["compile"] for block in model.blocks)
    assert torch.equal(stream(model, 1), eager)
    assert len(compiled_calls) == 5 * len(model.blocks)  # 4 steps + clean pass, each block compiled
    assert "already compiled" in compile_blocks(model, "cpu")


def test_checkpointing_wraps_the_compiled_forward_when_enabled_first(monkeypatch):
    """Whatever the order they are turned on, compile runs inside gradient checkpointing."""
    from selfforcing_core import dmd
    use_compiler(monkeypatch, lambda fn, **kwargs: fn)
    model = tiny_model()
    dmd.enable_gradient_checkpointing(model)
    compile_blocks(model, "cpu")
    block = model.blocks[0]
    assert list(block.forward_wrappers) == ["checkpoint", "compile"]  # insertion order ...
    order = []
    for kind in ("compile", "checkpoint"):
        wrapper = block.forward_wrappers[kind]
        block.wrap_forward(kind, lambda inner, *args, _w=wrapper, _k=kind: order.append(_k) or _w(inner, *args))
    stream(model, 1)
    assert order[:2] == ["checkpoint", "compile"]  # ... but checkpointing is the outer wrapper
