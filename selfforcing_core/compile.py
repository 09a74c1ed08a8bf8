"""Optional ``torch.compile`` of the transformer blocks, with a clean fall back to eager.

Each block's plain forward is compiled and installed as its ``compile`` forward wrapper
(parameter names unchanged; gradient checkpointing wraps around it, see ``model.Block``). The KV cache's
bookkeeping (``KVCache.store`` / ``cross``) stays eager, so the compiled graphs see only tensors
of fixed shape per stream: after the first blocks (the start frame and the number of cached
frames become symbolic) a long stream never recompiles. ``compiled_graph_count`` exposes
dynamo's counter so tests and benchmarks can show it.

Failure is never fatal: when the compiler is unusable (no C compiler, no Triton, an inductor
error on the first call) one warning is issued and every block runs eagerly from then on.
"""
import warnings

import torch
import torch.nn as nn


def describe(error: Exception) -> str:
    """First line of an exception, with its type."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class CompileState:
    """Shared by the blocks of one model: the first failure turns compilation off for all of them."""

    def __init__(self):
        self.error: str | None = None

    def fail(self, error: Exception):
        if self.error is None:
            self.error = describe(error)
            warnings.warn(f"torch.compile failed ({self.error}); running the transformer eagerly. "
                          "Results are unchanged, only slower. Turn the compile option off to silence this.",
                          RuntimeWarning, stacklevel=3)


class CompiledForward:
    """A block's ``compile`` forward wrapper: the compiled plain forward, or the eager one after a failure."""

    def __init__(self, block: nn.Module, state: CompileState, mode: str | None):
        self.compiled = torch.compile(block.plain_forward, mode=mode)
        self.state = state

    def __call__(self, eager, *args):
        if self.state.error is None:
            try:
                return self.compiled(*args)
            except Exception as error:  # inductor/triton/C-compiler failures surface on the first call
                self.state.fail(error)
        return eager(*args)


def compiler_works(device) -> str | None:
    """Compile and run a two-op function on ``device``; None if it works, else the reason."""
    try:
        probe = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1)
        probe(torch.ones(8, device=device))
        return None
    except Exception as error:
        return describe(error)


def compile_blocks(model: nn.Module, device=None, mode: str | None = None) -> str:
    """Compile every transformer block of ``model`` in place; returns a report line.

    device: where the model will run (default: ``model.device``), probed first.
    mode: ``torch.compile`` mode (None = default; "max-autotune-no-cudagraphs" as the official
    demo). CUDA graphs are not supported (the cache is written in place). Calling it twice is a
    no-op. On failure the model stays eager and one warning is issued.
    """
    blocks = model.blocks
    if all("compile" in block.forward_wrappers for block in blocks):
        return f"torch.compile: {len(blocks)} blocks already compiled"
    device = device or model.device
    reason = compiler_works(device)
    if reason is not None:
        CompileState().fail(RuntimeError(reason))
        return f"torch.compile unavailable ({reason}); running eagerly"
    state = CompileState()
    for block in blocks:
        block.wrap_forward("compile", CompiledForward(block, state, mode))
    model.compile_state = state
    return f"torch.compile: {len(blocks)} blocks compiled (mode {mode or 'default'}); first call compiles"


def compile_failed(model: nn.Module) -> str | None:
    """Reason the model's compiled blocks fell back to eager, or None (not compiled / working)."""
    return None if model.compile_state is None else model.compile_state.error


def compiled_graph_count() -> int:
    """Number of distinct graphs dynamo has compiled in this process (grows by one per recompile)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]
