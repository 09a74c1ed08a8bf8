"""Helpers shared by tests, benchmarks, ``workflows/generate.py`` and ``scripts/`` (not part of the pack).

* ``tiny``: the tiny random causal Wan models of tests and small benchmarks (their configs defined once).
* ``decoder_weights``: random TAEHV / Wan VAE state dicts in the real key layouts.
* ``files``: writers of small media and fixture files (GIF clips, parity fixture roots) and a video reader.
* ``comfy_paths`` / ``comfy_server`` / ``comfy_host``: locate the ComfyUI host, run it as a server, test glue.
* ``tiny_workflows``: the shared workflows' prompts with the tiny models swapped in.
* ``frontend`` / ``live_player``: the host's own frontend in headless Chromium; the live player driven in it.
* ``rounding``: bounds for one quantity computed in two orders, derived from the computation.

Import as ``support.x`` from the repository root: pytest puts the root on its path
(``tests/pytest.ini``); benchmarks and scripts run as modules (``python -m benchmarks.bench_x``).
"""
