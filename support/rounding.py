"""Bounds for comparing one quantity computed in two orders, derived from the computation.

Two evaluation orders of the same mathematics (cache vs recompute, merged vs adapter weights, chunked
vs whole) round differently, and how differently depends on the CPU's kernels and reduction order.
So the tests do not compare float32 networks with fixed absolute bounds:

* a network computed two ways is compared in float64 (``assert_float64_orders_agree``): rounding is
  then ~1e-16 of the values on any CPU, and the bound still sees any real error;
* where a path computes in float32 whatever the model's dtype (LoRA merges, the codecs), float32 results
  are compared within the rounding of the reductions on the way (``assert_within_float32_reductions``);
* a short elementwise formula computed two ways is compared in its own dtype within
  ``roundings`` half-ulp steps of the largest value it passes through (``assert_within_roundings``).

Where both sides run the same operations on the same shapes the tests compare exactly instead.
"""
import torch

# Float32 runs of the networks in these tests differ by at most 3 eps32 of the largest value between
# two orders (cached rollout vs block-causal recompute, the widest: 3.4e-7 relative), and the same
# reductions in float64 by a few eps64 (~1e-15). 2^-32 (2.3e-10) of the largest value leaves a factor
# of 10^5 for any CPU's reduction order, and is 10^6 below the smallest error a wrong cache entry,
# mask, timestep or merged weight makes (1e-4 of the values and more).
FLOAT64_ORDER_TOLERANCE = 2.0 ** -32


def assert_float64_orders_agree(actual: torch.Tensor, expected: torch.Tensor):
    """Two float64 computations of one network output agree within ``FLOAT64_ORDER_TOLERANCE`` of the
    largest |expected|."""
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    bound = FLOAT64_ORDER_TOLERANCE * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, atol=bound, rtol=0)


def assert_within_roundings(actual: torch.Tensor, expected: torch.Tensor, magnitude, roundings: int,
                            dtype: torch.dtype | None = None):
    """Two evaluations of a short formula agree within ``roundings`` * eps of ``magnitude`` (a number or
    a tensor broadcast against the values: the largest intermediate value the formula passes through);
    eps of ``dtype``, the dtype the rounding happens in (by default the coarser of the two results').

    Each rounded operation moves its result by at most half an ulp (eps / 2 relative), so an evaluation
    with at most ``roundings`` rounded operations on the way to each value is within
    roundings * eps / 2 * magnitude of the exact value, and two such evaluations within twice that.
    """
    eps = torch.finfo(dtype).eps if dtype else max(torch.finfo(actual.dtype).eps, torch.finfo(expected.dtype).eps)
    bound = roundings * eps * torch.as_tensor(magnitude, dtype=torch.float64)
    excess = (actual.double() - expected.double()).abs() - bound
    assert excess.max() <= 0, (f"differ by more than {roundings} roundings: worst excess {float(excess.max()):.3g} "
                               f"over a bound of {float(bound.max()):.3g}")


def assert_within_float32_reductions(actual: torch.Tensor, expected: torch.Tensor, reduction_length: int,
                                     depth: int):
    """Two float32 computations of one network output, through ``depth`` reductions (matmuls, norms,
    softmax sums, convolutions) in sequence, none longer than ``reduction_length`` terms, agree within
    8 sqrt(depth * reduction_length) eps32 of the largest |expected|.

    Each output passes through at most N = depth * reduction_length rounded operations on values of the
    output's size (normalised activations, bounded weights). Rounding errors behave as independent
    random steps of at most eps/2: the probabilistic bound of Higham and Mary (SIAM J. Sci. Comput.
    2019) puts each evaluation within lambda sqrt(N) eps/2 of the exact value except with probability
    2 N exp(-lambda^2 / 2); lambda = 8 makes that < 1e-8 for N < 1e6, and two evaluations differ by at
    most twice the one bound.
    """
    eps = torch.finfo(torch.float32).eps
    bound = 8 * (depth * reduction_length) ** 0.5 * eps * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, atol=bound, rtol=0)


def wan_forward_reductions(config, tokens: int) -> tuple[int, int]:
    """(reduction_length, depth) of one causal Wan forward over ``tokens`` video tokens, for
    ``assert_within_float32_reductions``.

    Per block, in sequence: LayerNorm (mean, variance), q projection, q RMSNorm, scores, softmax sum,
    weighted sum, output projection (self-attention); the same eight for cross-attention plus its
    LayerNorm; LayerNorm and two linears (FFN): 20. Outside the blocks: patch embedding, the timestep
    MLP (3), the text MLP (2), the head's LayerNorm (2) and linear: 9.
    """
    longest = max(config.dim, config.ffn_dim, config.freq_dim, config.text_dim, config.text_len, tokens,
                  config.in_dim * config.patch_size[0] * config.patch_size[1] * config.patch_size[2])
    return longest, 20 * config.num_layers + 9


def module_reductions(module: torch.nn.Module, tokens: int = 1) -> tuple[int, int]:
    """(reduction_length, depth) of one pass through a codec part (an encoder or a decoder), for
    ``assert_within_float32_reductions``: every convolution and linear layer (in_channels x kernel
    inputs per output), every norm, and three reductions per attention block over ``tokens`` positions;
    residual branches are counted as if in sequence (an upper bound)."""
    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))]
    norms = [m for m in module.modules() if "Norm" in type(m).__name__]
    attention = [m for m in module.modules() if "Attention" in type(m).__name__]
    longest = max(m.weight[0].numel() for m in layers)
    return max(longest, tokens), len(layers) + len(norms) + 3 * len(attention)
