"""Random state dicts in the real key layouts of taew2_1 and Wan2.1_VAE.pth, at any width.

The layouts are written out here from the official configurations (not from our modules), so
loading them checks our key layout; ``test_*_layout_matches_real_checkpoint`` compares them with
the real checkpoints' key lists.
"""
import torch


def _fill(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Gammas 1 + 0.15 N, biases 0.05 N, weights N / sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith("gamma"):
            state_dict[key] = 1 + 0.15 * noise
        elif key.endswith("bias"):
            state_dict[key] = 0.05 * noise
        else:
            state_dict[key] = noise / (torch.tensor(shape[1:]).prod().item() ** 0.5)
    return state_dict


def taehv_shapes(decoder_widths=(256, 128, 64, 64), encoder_width=64, latent=16) -> dict[str, tuple]:
    """Key -> shape of taew2_1.pth at the given widths (real: (256, 128, 64, 64), 64)."""
    shapes = {}

    def conv(key, n_out, n_in, k=3, bias=True):
        shapes[f"{key}.weight"] = (n_out, n_in, k, k)
        if bias:
            shapes[f"{key}.bias"] = (n_out,)

    def mem(key, width):
        conv(f"{key}.conv.0", width, 2 * width)
        conv(f"{key}.conv.2", width, width)
        conv(f"{key}.conv.4", width, width)

    e = encoder_width
    conv("encoder.0", e, 3)
    for pool, pool_stride in ((2, 2), (7, 2), (12, 1)):
        conv(f"encoder.{pool}.conv", e, pool_stride * e, k=1, bias=False)
        conv(f"encoder.{pool + 1}", e, e, bias=False)
        for i in range(pool + 2, pool + 5):
            mem(f"encoder.{i}", e)
    conv("encoder.17", latent, e)
    w0, w1, w2, w3 = decoder_widths
    conv("decoder.1", w0, latent)
    for first_mem, width, grow_stride, next_width in ((3, w0, 1, w1), (9, w1, 2, w2), (15, w2, 2, w3)):
        for i in range(first_mem, first_mem + 3):
            mem(f"decoder.{i}", width)
        conv(f"decoder.{first_mem + 4}.conv", grow_stride * width, width, k=1, bias=False)
        conv(f"decoder.{first_mem + 5}", next_width, width, bias=False)
    conv("decoder.22", 3, w3)
    return shapes


def wan_vae_shapes(dim=96, z_dim=16) -> dict[str, tuple]:
    """Key -> shape of Wan2.1_VAE.pth with base width ``dim`` (real: 96)."""
    shapes = {}

    def conv3d(key, n_out, n_in, k=(3, 3, 3)):
        shapes[f"{key}.weight"] = (n_out, n_in, *k)
        shapes[f"{key}.bias"] = (n_out,)

    def residual(key, n_in, n_out):
        shapes[f"{key}.residual.0.gamma"] = (n_in, 1, 1, 1)
        conv3d(f"{key}.residual.2", n_out, n_in)
        shapes[f"{key}.residual.3.gamma"] = (n_out, 1, 1, 1)
        conv3d(f"{key}.residual.6", n_out, n_out)
        if n_in != n_out:
            conv3d(f"{key}.shortcut", n_out, n_in, (1, 1, 1))

    def middle(key, c):
        residual(f"{key}.0", c, c)
        shapes[f"{key}.1.norm.gamma"] = (c, 1, 1)
        conv3d(f"{key}.1.to_qkv", 3 * c, c, (1, 1))
        conv3d(f"{key}.1.proj", c, c, (1, 1))
        residual(f"{key}.2", c, c)

    dims = [dim * m for m in (1, 1, 2, 4, 4)]
    conv3d("encoder.conv1", dims[0], 3)
    index = 0
    for stage, temporal in zip(range(4), (False, True, True, None)):
        n_in, n_out = dims[stage], dims[stage + 1]
        for _ in range(2):
            residual(f"encoder.downsamples.{index}", n_in, n_out)
            n_in, index = n_out, index + 1
        if temporal is not None:
            conv3d(f"encoder.downsamples.{index}.resample.1", n_out, n_out, (3, 3))
            if temporal:
                conv3d(f"encoder.downsamples.{index}.time_conv", n_out, n_out, (3, 1, 1))
            index += 1
    middle("encoder.middle", dims[-1])
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv3d("encoder.head.2", 2 * z_dim, dims[-1])
    conv3d("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv3d("conv2", z_dim, z_dim, (1, 1, 1))

    dims = [dim * m for m in (4, 4, 4, 2, 1)]
    conv3d("decoder.conv1", dims[0], z_dim)
    middle("decoder.middle", dims[0])
    index = 0
    for stage, temporal in zip(range(4), (True, True, False, None)):
        n_in, n_out = dims[stage] // (2 if stage else 1), dims[stage + 1]
        for _ in range(3):
            residual(f"decoder.upsamples.{index}", n_in, n_out)
            n_in, index = n_out, index + 1
        if temporal is not None:
            conv3d(f"decoder.upsamples.{index}.resample.1", n_out // 2, n_out, (3, 3))
            if temporal:
                conv3d(f"decoder.upsamples.{index}.time_conv", 2 * n_out, n_out, (3, 1, 1))
            index += 1
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv3d("decoder.head.2", 3, dims[-1])
    return shapes


def taehv_state_dict(decoder_widths=(16, 8, 8, 8), encoder_width=8, seed=0) -> dict[str, torch.Tensor]:
    return _fill(taehv_shapes(decoder_widths, encoder_width), seed)


def wan_vae_state_dict(dim=4, seed=0) -> dict[str, torch.Tensor]:
    return _fill(wan_vae_shapes(dim), seed)
