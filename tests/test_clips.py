"""Clip folders: real mp4 / gif / image-sequence clips written here, windows, cache, skips, errors."""
import logging

import av
import numpy as np
import pytest
import torch
from PIL import Image

from selfforcing_core.clips import load_clips, prepare_clips, read_frames
from selfforcing_core.images import resize_to

HEIGHT, WIDTH = 32, 48


def gray_level(i):  # frame i of every written clip is a flat gray of this value (0..255)
    return 40 + 15 * i


def frames_rgb(count):
    return [np.full((HEIGHT, WIDTH, 3), gray_level(i), dtype=np.uint8) for i in range(count)]


def write_video(path, count, codec, pix_fmt):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        for array in frames_rgb(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def fake_encoder(calls):
    """Stand-in with the encoder contract: [B, T, 3, H, W] -> [B, 1 + (T-1)//4, 16, H/8, W/8]."""
    def encode(frames):
        calls.append(frames.shape)
        kept = frames[:, ::4]
        pooled = torch.nn.functional.avg_pool2d(kept.flatten(0, 1), 8).unflatten(0, kept.shape[:2])
        return pooled.repeat(1, 1, 6, 1, 1)[:, :, :16]
    return encode


@pytest.fixture
def clip_folder(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video(folder / "car.mp4", 12, "libx264", "yuv420p")
    (folder / "car.txt").write_text("a red car\n")
    write_video(folder / "wave.gif", 9, "gif", "rgb8")
    (folder / "frames").mkdir()
    for i, array in enumerate(frames_rgb(5)):
        Image.fromarray(array).save(folder / "frames" / f"{i:03}.png")
    write_video(folder / "short.mp4", 3, "libx264", "yuv420p")
    (folder / "broken.mp4").write_bytes(b"not a video at all" * 10)
    return folder


def embeddings():
    negative, for_all = torch.full((4, 32), -1.0), torch.full((6, 32), 2.0)
    return negative, for_all, lambda text: torch.full((3, 32), float(len(text)))


def test_prepare_clips_windows_captions_and_skips(clip_folder, tmp_path, caplog):
    negative, for_all, embed = embeddings()
    calls = []
    with caplog.at_level(logging.WARNING):
        data = prepare_clips(clip_folder, tmp_path / "cache", fake_encoder(calls), width=16, height=16,
                             latent_frames=2, negative=negative, prompt=for_all, embed_caption=embed)
    assert data.names == ["car.mp4#0", "car.mp4#1", "frames#0", "wave.gif#0"]
    assert data.latents.shape == (4, 2, 16, 2, 2)
    assert all(shape == (1, 5, 3, 16, 16) for shape in calls) and len(calls) == 4
    assert "short.mp4" in caplog.text and "broken.mp4" in caplog.text
    # window 1 of car.mp4 starts at video frame 5; latent frames come from video frames 5 and 9
    expected = torch.tensor([gray_level(5), gray_level(9)]) / 255
    torch.testing.assert_close(data.latents[1].mean(dim=(1, 2, 3)), expected, atol=0.03, rtol=0)
    torch.testing.assert_close(data.latents[3].mean(dim=(1, 2, 3)), torch.tensor([gray_level(0), gray_level(4)]) / 255,
                               atol=0.03, rtol=0)
    assert torch.equal(data.prompts[0], torch.full((3, 32), float(len("a red car"))))
    assert torch.equal(data.prompts[2], for_all) and torch.equal(data.negative, negative)
    again = load_clips(tmp_path / "cache")
    assert torch.equal(again.latents, data.latents) and again.names == data.names


def test_cached_windows_are_not_encoded_again(clip_folder, tmp_path):
    negative, for_all, embed = embeddings()
    first = prepare_clips(clip_folder, tmp_path / "cache", fake_encoder([]), width=16, height=16, latent_frames=2,
                          negative=negative, prompt=for_all, embed_caption=embed)

    def refuse(frames):
        raise AssertionError("encoder called for a cached window")
    second = prepare_clips(clip_folder, tmp_path / "cache", refuse, width=16, height=16, latent_frames=2,
                           negative=negative, prompt=for_all, embed_caption=embed)
    assert torch.equal(first.latents, second.latents)


def test_errors_name_the_problem(clip_folder, tmp_path):
    negative, for_all, embed = embeddings()
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "broken.webm").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="no usable clip"):
        prepare_clips(only_bad, tmp_path / "c1", fake_encoder([]), width=16, height=16, latent_frames=2,
                      negative=negative, prompt=for_all)
    with pytest.raises(ValueError, match="multiples of 16"):
        prepare_clips(clip_folder, tmp_path / "c2", fake_encoder([]), width=20, height=16, latent_frames=2,
                      negative=negative, prompt=for_all)
    with pytest.raises(ValueError, match="no caption"):
        prepare_clips(clip_folder, tmp_path / "c3", fake_encoder([]), width=16, height=16, latent_frames=2,
                      negative=negative)
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        load_clips(tmp_path / "nowhere")


def test_read_frames_and_center_crop(clip_folder):
    frames = read_frames(clip_folder / "wave.gif")
    assert frames.shape == (9, 3, HEIGHT, WIDTH) and frames.dtype == torch.float32
    torch.testing.assert_close(frames.mean(dim=(1, 2, 3)), torch.tensor([gray_level(i) for i in range(9)]) / 255,
                               atol=0.03, rtol=0)
    stripes = torch.cat([torch.zeros(1, 3, 10, 10), torch.full((1, 3, 10, 10), 0.5), torch.ones(1, 3, 10, 10)], 3)
    torch.testing.assert_close(resize_to(stripes, 10, 10), torch.full((1, 3, 10, 10), 0.5))
    assert resize_to(stripes, 32, 16).shape == (1, 3, 32, 16)
