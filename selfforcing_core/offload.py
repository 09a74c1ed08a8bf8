"""Block offload: keep some transformer blocks in CPU memory and stream them in per call.

An offloaded block's parameters and buffers live on the CPU (pinned when CUDA is available, so
host-to-device copies can be non-blocking). A forward pre-hook copies them to the compute
device just before the block runs and a forward hook drops the device copies right after, so
the device holds at most one offloaded block at a time. Everything else moves to the device.
On a CPU compute device the copies are no-ops but the same hooks run.
"""
import torch
import torch.nn as nn


class BlockOffload:
    """Hooks of one offloaded block: CPU tensors kept, device copies made per call."""

    def __init__(self, block: nn.Module, device: torch.device):
        self.device = device
        self.tensors = [*block.parameters(), *block.buffers()]
        pin = torch.cuda.is_available() and device.type == "cuda"
        self.host = [t.data.to("cpu").pin_memory() if pin else t.data.to("cpu") for t in self.tensors]
        self.load_count = 0  # calls that streamed the block in (tests and benchmarks read it)
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host
        self.handles = [block.register_forward_pre_hook(self.load), block.register_forward_hook(self.unload)]

    def load(self, module, args):
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host.to(self.device, non_blocking=True)
        self.load_count += 1

    def unload(self, module, args, output):
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host

    def remove(self):
        for handle in self.handles:
            handle.remove()


def offload_blocks(model: nn.Module, num_blocks: int, device) -> str:
    """Move ``model`` to ``device`` except its first ``num_blocks`` blocks, which are streamed in per call.

    Returns a report line with the bytes kept off the device. num_blocks 0 just moves the model.
    """
    blocks = model.blocks
    if not 0 <= num_blocks <= len(blocks):
        raise ValueError(f"offload_blocks must be in 0..{len(blocks)} for this model, got {num_blocks}")
    for block in blocks:  # calling twice re-plans from scratch
        if block.offload is not None:
            block.offload.remove()
            block.offload = None
    device = torch.device(device)
    offloaded = blocks[:num_blocks]
    for block in blocks[num_blocks:]:
        block.to(device)
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for block in offloaded:
        block.offload = BlockOffload(block, device)
    host = [t for block in offloaded for t in block.offload.host]
    host_bytes = sum(t.numel() * t.element_size() for t in host)
    pinned = " from pinned memory" if host and host[0].is_pinned() else ""
    return (f"offload: {num_blocks}/{len(blocks)} blocks kept on the CPU ({host_bytes / 2**30:.2f} GiB), "
            f"streamed to {device} per call{pinned}")
