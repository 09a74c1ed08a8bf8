"""The linear kernel: oneDNN's matmul on the CPU when nothing needs a gradient, else ``F.linear``.

torch's CPU ``F.linear`` calls the BLAS it was built with (MKL). On AMD CPUs MKL's float32 GEMM
runs far below the hardware: on the project's machine (AMD EPYC, AVX-512) oneDNN, which torch
also ships, computes the 1.3B model's float32 linears 2.4x faster (305 against 127 GFLOP/s at 48
rows, 372 against 156 at 192), and a whole 30-layer block 2.1-2.2x faster
(``benchmarks/bench_precision.py`` prints both). Results are IEEE float32 (or bfloat16) in another
summation order, so they differ from BLAS by rounding only.

    y = linear(x, weight, bias)      # x [..., in], weight [out, in], bias [out] or None -> [..., out]
    layer = Linear(in_features, out_features)   # nn.Linear (same parameters, same names) using it

oneDNN is used for plain CPU tensors of float32 or bfloat16 (one dtype for x, weight and bias)
when no gradient is being recorded, since it has no backward; training, other devices and dtypes
and tensor subclasses (fake tensors of FLOP counting, for instance) get ``F.linear``. The oneDNN
call is the custom op ``selfforcing::onednn_linear``, so ``torch.compile`` graphs call it as it is
(the compiler's own lowering of oneDNN's op takes only constant weights). Set
``SELFFORCING_CPU_LINEAR=blas`` to use torch's BLAS path everywhere; ``cpu_kernel`` switches it
for a block of code.
"""
import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNEL_ENV = "SELFFORCING_CPU_LINEAR"
KERNELS = ("onednn", "blas")
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)

cpu_kernel_name = os.environ.get(KERNEL_ENV, "onednn")
if cpu_kernel_name not in KERNELS:
    raise ValueError(f"{KERNEL_ENV}={cpu_kernel_name!r}: use one of {KERNELS}")


def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's linear op on the CPU (a build without oneDNN has not)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN_AVAILABLE = onednn_linear_available()


@contextlib.contextmanager
def cpu_kernel(name: str):
    """Use ``name`` ("onednn" or "blas") for CPU linears inside the block."""
    global cpu_kernel_name
    if name not in KERNELS:
        raise ValueError(f"unknown CPU linear kernel {name!r}: use one of {KERNELS}")
    previous, cpu_kernel_name = cpu_kernel_name, name
    try:
        yield
    finally:
        cpu_kernel_name = previous


def onednn_chosen() -> bool:
    """Whether CPU linears go to oneDNN where they can: chosen (``cpu_kernel_name``) and available."""
    return cpu_kernel_name == "onednn" and ONEDNN_AVAILABLE


def describe_cpu_kernel() -> str:
    """The CPU linear kernel in use, for ``info``."""
    return "CPU linears: oneDNN (inference), BLAS (training)" if onednn_chosen() else "CPU linears: BLAS"


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``linear`` sends these tensors to oneDNN (see the module docstring)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (onednn_chosen() and x.device.type == "cpu"
            and x.dtype in ONEDNN_DTYPES and all(t.dtype == x.dtype for t in tensors)
            and all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


@torch.library.custom_op("selfforcing::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's ``x @ weight.T + bias`` (CPU, no backward). Shapes as ``linear``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def onednn_linear_shape(x, weight, bias):
    """The output of ``onednn_linear`` for fake tensors (tracing, compilation): [..., out]."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``. x: [..., in]; weight: [out, in]; bias: [out] or None -> [..., out]."""
    if uses_onednn(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``linear``: the same parameters and state-dict names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
