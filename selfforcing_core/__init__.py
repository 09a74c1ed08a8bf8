"""Self Forcing in plain PyTorch: causal Wan generator, KV cache, samplers, decoders, trainer.

This package never imports ComfyUI.
"""
