"""Prompt-embedding files: core round trip and errors, then Load/Save nodes inside a real ComfyUI."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfforcing_core import prompt_embeddings
from selfforcing_core.prompt_embeddings import load_prompt_embeddings, save_prompt_embeddings

LOAD, SAVE = "SelfForcingLoadPromptEmbeddings", "SelfForcingSavePromptEmbeddings"


def wan_conditioning(seed=0):
    """CONDITIONING as ComfyUI's umT5 encode returns it for Wan ([1, 512, 4096], pooled None),
    plus a second entry with other dtypes and tensor / plain extras."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(1, 512, 4096, generator=generator), {"pooled_output": None}),
        (torch.randn(1, 7, 16, generator=generator).to(torch.bfloat16),
         {"pooled_output": None, "attention_mask": torch.ones(1, 7, dtype=torch.int64),
          "start_percent": 0.25, "label": "second", "flag": True}),
    ]


def assert_same_entries(actual, expected):
    assert len(actual) == len(expected)
    for (context, extras), (expected_context, expected_extras) in zip(actual, expected):
        assert context.dtype == expected_context.dtype and torch.equal(context, expected_context)
        assert extras.keys() == expected_extras.keys()
        for key, value in expected_extras.items():
            if isinstance(value, torch.Tensor):
                assert extras[key].dtype == value.dtype and torch.equal(extras[key], value)
            else:
                assert extras[key] == value and type(extras[key]) is type(value)


def test_round_trip_keeps_tensors_dtypes_and_extras(tmp_path):
    entries = wan_conditioning()
    path = tmp_path / "sub" / "prompt.safetensors"
    save_prompt_embeddings(path, entries)
    assert_same_entries(load_prompt_embeddings(path), entries)
    assert os.listdir(path.parent) == ["prompt.safetensors"]


def test_failed_write_keeps_the_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "prompt.safetensors"
    first = wan_conditioning(seed=1)
    save_prompt_embeddings(path, first)

    def write_half_then_fail(tensors, temp_path, metadata):
        with open(temp_path, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_prompt_embeddings(path, wan_conditioning(seed=2))
    assert_same_entries(load_prompt_embeddings(path), first)
    assert os.listdir(tmp_path) == ["prompt.safetensors"]


def test_unsavable_extras_and_bad_contexts_are_refused_by_name(tmp_path):
    path = tmp_path / "prompt.safetensors"
    with pytest.raises(ValueError, match="'control' of type object"):
        save_prompt_embeddings(path, [(torch.zeros(1, 4, 8), {"control": object()})])
    with pytest.raises(ValueError, match=r"shape \(4, 8\)"):
        save_prompt_embeddings(path, [(torch.zeros(4, 8), {})])
    with pytest.raises(ValueError, match="empty"):
        save_prompt_embeddings(path, [])
    assert not path.exists()


def test_bad_files_give_errors_that_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_prompt_embeddings(tmp_path / "missing.safetensors")

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        load_prompt_embeddings(junk)

    weights = tmp_path / "weights.safetensors"
    save_file({"blocks.0.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(ValueError, match="not a prompt-embedding file"):
        load_prompt_embeddings(weights)

    missing_entry = tmp_path / "missing_entry.safetensors"
    metadata = {"format": prompt_embeddings.FILE_FORMAT, "extras": "[{}, {}]"}
    save_file({"context.0": torch.zeros(1, 3, 8)}, missing_entry, metadata=metadata)
    with pytest.raises(ValueError, match="no 'context.1'"):
        load_prompt_embeddings(missing_entry)

    stray = tmp_path / "stray.safetensors"
    save_file({"context.0": torch.zeros(1, 3, 8), "extras.5.mask": torch.zeros(3)}, stray,
              metadata={**metadata, "extras": "[{}]"})
    with pytest.raises(ValueError, match="extras.5.mask"):
        load_prompt_embeddings(stray)


@pytest.mark.host
def test_comfyui_load_then_save_gives_identical_tensors(comfy_server):
    entries = wan_conditioning(seed=3)
    save_prompt_embeddings(comfy_server.model_dir("prompt_embeddings") / "e2e_in.safetensors", entries)
    entry = comfy_server.run({
        "1": {"class_type": LOAD, "inputs": {"embeddings": "e2e_in.safetensors"}},
        "2": {"class_type": SAVE, "inputs": {"conditioning": ["1", 0], "filename_prefix": "e2e/out"}},
    })
    saved = entry["outputs"]["2"]["prompt_embeddings"]
    assert saved == [{"filename": os.path.join("e2e", "out_00001_.safetensors"), "folder": "prompt_embeddings"}]
    path = comfy_server.model_dir("prompt_embeddings") / saved[0]["filename"]
    assert_same_entries(load_prompt_embeddings(path), entries)
    assert load_file(path).keys() == {"context.0", "context.1", "extras.1.attention_mask"}


@pytest.mark.host
def test_comfyui_extras_added_by_host_nodes_are_saved(comfy_server):
    entries = wan_conditioning(seed=4)[:1]
    save_prompt_embeddings(comfy_server.model_dir("prompt_embeddings") / "range_in.safetensors", entries)
    entry = comfy_server.run({
        "1": {"class_type": LOAD, "inputs": {"embeddings": "range_in.safetensors"}},
        "2": {"class_type": "ConditioningSetTimestepRange",
              "inputs": {"conditioning": ["1", 0], "start": 0.0, "end": 0.5}},
        "3": {"class_type": SAVE, "inputs": {"conditioning": ["2", 0], "filename_prefix": "range_out"}},
    })
    path = comfy_server.model_dir("prompt_embeddings") / entry["outputs"]["3"]["prompt_embeddings"][0]["filename"]
    [(context, extras)] = load_prompt_embeddings(path)
    assert torch.equal(context, entries[0][0])
    assert extras == {"pooled_output": None, "start_percent": 0.0, "end_percent": 0.5}


@pytest.mark.host
def test_comfyui_unknown_file_name_is_a_validation_error(comfy_server):
    from support.comfy_host import PromptValidationError
    prompt = {
        "1": {"class_type": LOAD, "inputs": {"embeddings": "no_such_prompt.safetensors"}},
        "2": {"class_type": SAVE, "inputs": {"conditioning": ["1", 0], "filename_prefix": "never"}},
    }
    with pytest.raises(PromptValidationError) as refused:
        comfy_server.queue_prompt(prompt)
    message = str(refused.value)
    assert f"node 1 ({LOAD})" in message
    assert "no file 'no_such_prompt.safetensors' in models/prompt_embeddings" in message
    assert "Traceback" not in message


@pytest.mark.host
def test_comfyui_damaged_file_is_a_clear_execution_error(comfy_server):
    from support.comfy_host import PromptExecutionError
    (comfy_server.model_dir("prompt_embeddings") / "damaged.safetensors").write_bytes(b"\x00" * 64)
    prompt = {
        "1": {"class_type": LOAD, "inputs": {"embeddings": "damaged.safetensors"}},
        "2": {"class_type": SAVE, "inputs": {"conditioning": ["1", 0], "filename_prefix": "never"}},
    }
    with pytest.raises(PromptExecutionError) as failed:
        comfy_server.run(prompt)
    assert failed.value.details["node_type"] == LOAD
    assert "damaged.safetensors is not a readable .safetensors file" in str(failed.value)
