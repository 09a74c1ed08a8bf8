"""Live player cost and delay: per-block generation time with the player connected vs without, and
the delay from a block's end to its first frame shown in the browser (CPU, random weights).

One ComfyUI server (the real host) with a random-weight generator and TAEHV decoder; runs
alternate, in one process, between
  * player: queued by the host's frontend in headless Chromium, whose sampler node shows the live
    player (every block JPEG-encoded on the worker thread, sent over the websocket, drawn), and
  * no player: the same prompt queued over HTTP without a client (nothing encoded or sent);
each run has a new seed, and the kinds take turns going first. Per-block time = the run's
generation seconds (the sampler's info) / blocks; the first run of each kind is a warm-up. Printed:
the ratio of the kinds' medians and the median of each run's own ratio (its two prompts ran back
to back, so slow drifts of the machine cancel). The delay is measured in the browser: the
browser's clock at the draw of a block's first frame minus the server's clock at the block's end
(same machine).

    flock /tmp/heavy.lock .venv/bin/python -m benchmarks.bench_live [--runs 3] [--length 37]
        [--width 320 --height 192] [--dim 512 --layers 4]
"""
import argparse
import re
import statistics
import time

SECONDS = re.compile(r"(\d+) blocks in ([\d.]+) s")


def graph(args, seed, sampler):
    """API prompt: the sampler has id ``sampler`` (the player's node in the browser's graph)."""
    return {
        "m": {"class_type": "SelfForcingModelLoader",
              "inputs": {"model_name": "bench.safetensors", "weight_dtype": "fp32", "device": "default"}},
        "e": {"class_type": "SelfForcingLoadPromptEmbeddings", "inputs": {"embeddings": "bench.safetensors"}},
        "d": {"class_type": "SelfForcingDecoderLoader",
              "inputs": {"decoder_name": "vae_approx/taew2_1.safetensors", "dtype": "fp32"}},
        sampler: {"class_type": "SelfForcingStreamingSampler",
                  "inputs": {"model": ["m", 0], "positive": ["e", 0], "decoder": ["d", 0], "width": args.width,
                             "height": args.height, "length": args.length, "seed": seed,
                             "steps": "4 steps, shift 5 (paper)", "kv_window_frames": 9, "sink_frames": 3}},
        "v": {"class_type": "CreateVideo", "inputs": {"images": [sampler, 1], "fps": 16.0}},
        "p": {"class_type": "PreviewAny", "inputs": {"source": [sampler, 2]}},
    }


def per_block_seconds(entry, sampler) -> float:
    info = entry["outputs"][sampler]["selfforcing_live"][0]["info"]
    blocks, seconds = SECONDS.search(info).groups()
    return float(seconds) / int(blocks)


PLAYER_GRAPH_JS = """() => {
  app.graph.clear();
  const node = LiteGraph.createNode("SelfForcingStreamingSampler");
  app.graph.add(node);
  node.pos = [40, 40];
  return String(node.id);
}"""
QUEUE_JS = """async ([prompt, node]) => {
  const response = await app.api.fetchApi("/prompt", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({prompt, client_id: app.api.clientId})});
  return (await response.json()).prompt_id;
}"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each kind (after one warm-up each)")
    parser.add_argument("--length", type=int, default=37, help="video frames per run (4n + 1)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--dim", type=int, default=512, help="generator width (1536 = the real 1.3B)")
    parser.add_argument("--layers", type=int, default=4, help="generator blocks (30 = the real 1.3B)")
    args = parser.parse_args()

    import torch
    from selfforcing_core.model import CausalWanModel, WanConfig
    from selfforcing_core.prompt_embeddings import save_prompt_embeddings
    from support.comfy_paths import comfyui_root
    from support.comfy_server import ComfyServer
    from support.decoder_weights import taehv_state_dict
    from support.frontend import Frontend

    server = ComfyServer(comfyui_root()).start()
    try:
        torch.manual_seed(0)
        config = WanConfig(dim=args.dim, ffn_dim=4 * args.dim, num_layers=args.layers, num_heads=args.dim // 128,
                           text_dim=64)
        model = CausalWanModel(config)
        server.write_safetensors("diffusion_models", "bench.safetensors",
                                 {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()})
        del model
        server.write_safetensors("vae_approx", "taew2_1.safetensors", taehv_state_dict((256, 128, 64, 64), 64))
        save_prompt_embeddings(server.model_dir("prompt_embeddings") / "bench.safetensors",
                               [(torch.randn(1, 32, config.text_dim), {"pooled_output": None})])
        times = {"player": [], "no player": []}
        delays = []
        with Frontend(server) as frontend:
            node = frontend.page.evaluate(PLAYER_GRAPH_JS)
            for run in range(args.runs + 1):
                for kind in list(times) if run % 2 else list(times)[::-1]:  # each kind first in every other run
                    prompt = graph(args, 1000 * run + len(kind), node)
                    if kind == "player":
                        prompt_id = frontend.page.evaluate(QUEUE_JS, [prompt, node])
                        entry = server.wait(prompt_id, timeout=3600)
                        frontend.page.wait_for_function(
                            "(id) => { const p = app.graph.getNodeById(Number(id)).selfForcingLive; "
                            "return p.ended && p.queue.length === 0; }", arg=node, timeout=600_000)
                        latencies = frontend.page.evaluate(
                            "(id) => app.graph.getNodeById(Number(id)).selfForcingLive.latencies", node)
                    else:
                        entry = server.wait(server.queue_prompt(prompt), timeout=3600)
                        latencies = []
                    seconds = per_block_seconds(entry, node)
                    print(f"run {run} {kind:9s}: {seconds:.3f} s per block" + (" (warm-up)" if run == 0 else ""))
                    if run > 0:
                        times[kind].append(seconds)
                        delays += latencies
                    time.sleep(1)
        player, plain = statistics.median(times["player"]), statistics.median(times["no player"])
        print(f"\n{args.width}x{args.height}, {args.length} frames, generator dim {args.dim} x {args.layers} layers, "
              f"TAEHV, {args.runs} runs of each kind")
        print(f"per-block generation time, median: player {player:.3f} s, no player {plain:.3f} s, "
              f"ratio {player / plain:.3f} ({100 * (player / plain - 1):+.1f} %)")
        pairs = sorted(p / q for p, q in zip(times["player"], times["no player"]))
        print(f"per-run ratio, player / no player of the same run (adjacent in time): median "
              f"{statistics.median(pairs):.3f} ({100 * (statistics.median(pairs) - 1):+.1f} %), range "
              f"{pairs[0]:.3f}-{pairs[-1]:.3f} over {len(pairs)} runs")
        if delays:
            ordered = sorted(delays)
            p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
            print(f"block end -> its first frame shown in the browser: median {1000 * statistics.median(delays):.0f} ms, "
                  f"p95 {1000 * p95:.0f} ms ({len(delays)} blocks)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
