"""The live player (web/live_player.js) driven from Python in the host's frontend: the Live stream
workflow, a queue as the page's own tab, and the player's state (tests and scripts/record_live_player.py)."""
from support.comfy_paths import REPO_ROOT

LIVE_WORKFLOW = REPO_ROOT / "workflows" / "live_stream.json"

# Queue the open graph's prompt as this tab (its websocket client id), with the tiny models swapped in.
QUEUE_JS = """async (prompt) => {
  const workflow = (await app.graphToPrompt()).workflow;
  const response = await app.api.fetchApi("/prompt", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({prompt, client_id: app.api.clientId, extra_data: {extra_pnginfo: {workflow}}})});
  return (await response.json()).prompt_id;
}"""
PLAYER_JS = """(id) => {
  const p = app.graph.getNodeById(Number(id)).selfForcingLive;
  return {promptId: p.promptId, blocks: p.blocks, received: p.received, shown: p.shown, ended: p.ended,
          switches: p.switches, latencies: p.latencies, arrivals: p.arrivals, fps: p.achievedFps,
          message: p.message.textContent,
          stats: p.stats.textContent, now: Date.now() / 1000};
}"""
