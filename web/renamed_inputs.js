// Workflows saved before an input or type of this pack was renamed open with today's names (the
// rename happens on the workflow's JSON before the frontend builds the graph, so links stay).
// The trainer's training data was `clips` of type SELFFORCING_TRAINING_CLIPS, a name too close to
// the text encoder input `clip`; it is `training_videos` of type SELFFORCING_TRAINING_VIDEOS.
import { app } from "../../scripts/app.js";

const RENAMED_TYPES = { SELFFORCING_TRAINING_CLIPS: "SELFFORCING_TRAINING_VIDEOS" };
const RENAMED_SLOTS = { // node type: {former slot name: name now}
  SelfForcingTrainer: { clips: "training_videos" },
  SelfForcingTrainingClips: { clips: "training_videos" },
};

function renameSlot(slot, names) {
  const name = names[slot.name];
  if (name) {
    if (slot.localized_name === slot.name) slot.localized_name = name;
    if (slot.label === slot.name) delete slot.label;
    slot.name = name;
  }
  slot.type = RENAMED_TYPES[slot.type] ?? slot.type;
}

function renameGraph(graph) {
  for (const node of graph.nodes ?? []) {
    const names = RENAMED_SLOTS[node.type] ?? {};
    for (const slot of [...(node.inputs ?? []), ...(node.outputs ?? [])]) renameSlot(slot, names);
  }
  for (const link of graph.links ?? []) { // [id, from, slot, to, slot, type] or {type, ...}
    if (Array.isArray(link)) link[5] = RENAMED_TYPES[link[5]] ?? link[5];
    else if (link) link.type = RENAMED_TYPES[link.type] ?? link.type;
  }
  for (const subgraph of graph.definitions?.subgraphs ?? []) renameGraph(subgraph);
}

app.registerExtension({
  name: "selfforcing.renamedInputs",
  beforeConfigureGraph(graphData) {
    if (graphData) renameGraph(graphData);
  },
});
