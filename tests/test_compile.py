"""torch.compile of the blocks: same outputs as eager, no recompiles once a rolling stream is warm,
and a single warning with an eager fall back when compilation fails."""
import warnings

import pytest
import torch

import selfforcing_core.compile as compile_module
from selfforcing_core.compile import compile_blocks, compile_failed, compiled_graph_count, compiler_works
from selfforcing_core.model import CausalWanModel, WanConfig
from selfforcing_core.rollout import NoiseSource, stream_blocks

TINY = WanConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, text_dim=32, text_len=16)
PROMPT = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))


def tiny_model():
    torch.manual_seed(0)
    return CausalWanModel(TINY).eval().requires_grad_(False)


def stream(model, num_blocks, after_block=None):
    """Rolling-window rollout (window 6 frames = 2 blocks); returns all frames [1, F, C, H, W]."""
    blocks = stream_blocks(model, PROMPT, num_blocks, (16, 4, 4), kv_window_frames=6,
                           noise=NoiseSource(torch.Generator().manual_seed(1)),
                           callback=after_block)
    return torch.cat(list(blocks), dim=1)


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
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: C compiler not found")
        return run
    monkeypatch.setattr(compile_module, "compiler_works", lambda device: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
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
    assert all("forward" not in block.__dict__ for block in model.blocks)
    assert torch.equal(stream(model, 1), stream(tiny_model(), 1))
