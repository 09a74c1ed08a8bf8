"""Helpers shared by tests, benchmarks, ``workflows/generate.py`` and ``scripts/`` (not part of the pack).

* ``tiny``: the tiny random causal Wan model every test and small benchmark uses (its config defined once).
* ``decoder_weights``: random TAEHV / Wan VAE state dicts in the real key layouts.
* ``files``: writers of small media and fixture files (GIF clips, parity fixture roots) and a video reader.
* ``comfy_paths`` / ``comfy_server`` / ``comfy_host``: locate the ComfyUI host, run it as a server, test glue.
* ``frontend``: the host's own frontend in headless Chromium.

Import as ``support.x`` from the repository root: pytest puts the root on its path
(``tests/pytest.ini``); benchmarks and scripts run as modules (``python -m benchmarks.bench_x``).
"""
