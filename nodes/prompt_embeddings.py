"""Save Prompt Embeddings / Load Prompt Embeddings: CONDITIONING to a .safetensors file and back.

Files live in the host's `models/prompt_embeddings` folder (registered here; extra folders of
that name from `extra_model_paths.yaml` are searched too).
"""
import os

import folder_paths
from comfy_api.latest import io

from ..selfforcing_core.prompt_embeddings import load_prompt_embeddings, save_prompt_embeddings
from .common import register_folder, save_path

FOLDER = "prompt_embeddings"
register_folder(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), {".safetensors"})


class SavePromptEmbeddings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingSavePromptEmbeddings",
            display_name="Save Prompt Embeddings",
            category="Self-Forcing",
            description="Writes a text encoder's output to models/prompt_embeddings, so later runs "
                        "can use the prompt without loading the text encoder.",
            is_output_node=True,
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The encoded prompt, e.g. from CLIP Text Encode "
                                      "with the umT5 text encoder (CLIPLoader type wan)."),
                io.String.Input("filename_prefix", default="prompt",
                                tooltip="Name of the file inside models/prompt_embeddings (may contain a "
                                        "subfolder); a counter is appended, existing files are never overwritten."),
            ],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        if filename_prefix is not None:
            try:
                save_path(filename_prefix, folder_paths.get_folder_paths(FOLDER)[0], "filename_prefix")
            except ValueError as error:
                return str(error)
        return True

    @classmethod
    def execute(cls, conditioning, filename_prefix):
        output_dir = folder_paths.get_folder_paths(FOLDER)[0]
        os.makedirs(output_dir, exist_ok=True)
        folder, name, counter = save_path(filename_prefix, output_dir, "filename_prefix")
        file_name = f"{name}_{counter:05}_.safetensors"
        save_prompt_embeddings(os.path.join(folder, file_name), conditioning)
        saved = {"filename": os.path.relpath(os.path.join(folder, file_name), output_dir), "folder": FOLDER}
        return io.NodeOutput(ui={"prompt_embeddings": [saved]})


class LoadPromptEmbeddings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingLoadPromptEmbeddings",
            display_name="Load Prompt Embeddings",
            category="Self-Forcing",
            description="Reads a prompt embedding saved by Save Prompt Embeddings; no text encoder needed.",
            inputs=[
                io.Combo.Input("embeddings", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A .safetensors file in models/prompt_embeddings."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The saved CONDITIONING, as the text encoder returned it.")],
        )

    @classmethod
    def validate_inputs(cls, embeddings=None):
        # ComfyUI 0.3.75 does not check V3 combo values against their options; do it here.
        if embeddings is not None and folder_paths.get_full_path(FOLDER, embeddings) is None:
            return f"embeddings: no file '{embeddings}' in models/{FOLDER}; save one with Save Prompt Embeddings first"
        return True

    @classmethod
    def execute(cls, embeddings):
        entries = load_prompt_embeddings(folder_paths.get_full_path_or_raise(FOLDER, embeddings))
        return io.NodeOutput([[context, extras] for context, extras in entries])


NODES = [SavePromptEmbeddings, LoadPromptEmbeddings]
