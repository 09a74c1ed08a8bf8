"""The linear kernel (linear.py): oneDNN for CPU inference, torch's F.linear otherwise.

Both kernels are compared with the exact product (float64) within the deterministic bound of a dot
product of n terms: |fl(sum) - sum| <= gamma_n * sum |x_i w_i|, gamma_n = n u / (1 - n u), u = eps / 2
of the accumulation dtype (float32 for float32 and bfloat16 inputs), plus half an ulp of the output
dtype for the final rounding to bfloat16.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from selfforcing_core import linear as linear_module
from selfforcing_core.linear import Linear, cpu_kernel, linear

needs_onednn = pytest.mark.skipif(not linear_module.ONEDNN_AVAILABLE, reason="this torch has no oneDNN linear")


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def operands(dtype, rows=7, in_features=96, out_features=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, in_features, generator=g).to(dtype)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    return x, weight, bias


def assert_is_the_product(y, x, weight, bias):
    terms = x.shape[-1] + 1
    u = torch.finfo(torch.float32).eps / 2
    gamma = terms * u / (1 - terms * u)
    exact = F.linear(x.double(), weight.double(), bias.double())
    magnitude = F.linear(x.double().abs(), weight.double().abs(), bias.double().abs())
    bound = gamma * magnitude + torch.finfo(y.dtype).eps / 2 * exact.abs() * (y.dtype != torch.float32)
    excess = (y.double() - exact).abs() - bound
    assert excess.max() <= 0, f"worst excess {float(excess.max()):.3g} over the dot-product rounding bound"


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_uses_onednn_and_both_kernels_compute_the_product(dtype):
    x, weight, bias = operands(dtype)
    with torch.no_grad():
        with OpNames() as ops:
            y = linear(x, weight, bias)
        assert "onednn_linear" in ops.names and not ops.names & {"addmm", "mm"}
        with cpu_kernel("blas"), OpNames() as ops:
            y_blas = linear(x, weight, bias)
        assert "onednn_linear" not in ops.names
    assert y.shape == y_blas.shape == (2, 7, 40) and y.dtype == y_blas.dtype == dtype
    assert_is_the_product(y, x, weight, bias)
    assert_is_the_product(y_blas, x, weight, bias)
    assert_is_the_product(linear(x, weight), x, weight, torch.zeros_like(bias))  # no bias


def test_blas_kernel_is_exactly_f_linear():
    x, weight, bias = operands(torch.float32)
    with cpu_kernel("blas"):
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))


@needs_onednn
def test_gradients_run_f_linear_exactly():
    x, weight, bias = operands(torch.float32)
    layer = Linear(96, 40)
    layer.load_state_dict({"weight": weight, "bias": bias})
    reference = nn.Linear(96, 40)
    reference.load_state_dict({"weight": weight, "bias": bias})
    with OpNames() as ops:
        y = layer(x)
    assert "onednn_linear" not in ops.names
    assert torch.equal(y, reference(x))
    grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    expected = torch.autograd.grad(reference(x).square().sum(), list(reference.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))


@needs_onednn
def test_other_dtypes_and_fake_tensors_fall_back_to_f_linear():
    x, weight, bias = operands(torch.float64)
    with torch.no_grad(), OpNames() as ops:
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))  # oneDNN has no float64
    assert "onednn_linear" not in ops.names
    x, weight, bias = operands(torch.float32)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:  # real tensors: oneDNN, not counted
        linear(x, weight, bias)
    assert flops.get_total_flops() == 0
    from torch._subclasses.fake_tensor import FakeTensorMode
    with torch.no_grad(), FakeTensorMode(), FlopCounterMode(display=False) as flops:
        linear(*operands(torch.float32))  # fake tensors: F.linear, which the counter sees
    assert flops.get_total_flops() == 2 * 14 * 96 * 40


def test_linear_module_keeps_nn_linear_names_and_kernel_choice_is_checked():
    assert isinstance(Linear(3, 2), nn.Linear)
    assert Linear(3, 2).state_dict().keys() == nn.Linear(3, 2).state_dict().keys()
    with pytest.raises(ValueError, match="use one of"):
        with cpu_kernel("mkl"):
            pass
    assert linear_module.cpu_kernel_name in linear_module.KERNELS


@needs_onednn
def test_compiled_graphs_call_the_onednn_op_and_match_eager_exactly():
    from selfforcing_core.compile import compiler_works
    if compiler_works("cpu") is not None:
        pytest.skip(f"torch.compile unavailable: {compiler_works('cpu')}")
    x, weight, bias = operands(torch.float32)
    with torch.no_grad():
        compiled = torch.compile(lambda x: linear(x, weight, bias), fullgraph=True)
        with OpNames() as ops:
            eager = linear(x, weight, bias)
        assert "onednn_linear" in ops.names
        assert torch.equal(compiled(x), eager)  # the same kernel on the same shapes, inside the graph
