"""The live recording (selfforcing_core/recording.py): every appended block is in the file, decodable
and on the timeline, when ``append`` returns, even if the process is killed right after."""
import contextlib
import io
import logging
import signal
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from selfforcing_core.recording import Mp4Recorder, boxes, find_box, track_timescale
from support.comfy_paths import REPO_ROOT

WIDTH, HEIGHT, FPS = 64, 48, 16
BLOCK_FRAMES = [5, 4, 4]  # a shorter first block, as the samplers make (9, then 12 frames)
# H.264 at crf 18 quantises with a step of about 0.625 * 2^(18/6) = 5 levels (of 255), so a frame
# of flat colour on a smooth ramp comes back within half a step of its mean plus the 8-bit
# rounding of the yuv420p round trip (about 1 level): a mean absolute error below 4 levels.
TOLERANCE = 4.0


def stream_frames(count: int) -> np.ndarray:
    """uint8 [count, H, W, 3]: frame i is its own flat colour on a horizontal ramp (smooth, so H.264
    keeps it within TOLERANCE; every two frames differ by far more, so a swapped or dropped frame shows)."""
    ramp = np.linspace(0, 40, WIDTH)[None, :, None]
    colours = [[(40 + 47 * i) % 170, (60 + 89 * i) % 170, (80 + 131 * i) % 170] for i in range(count)]
    return np.stack([np.broadcast_to(ramp + np.array(c)[None, None, :], (HEIGHT, WIDTH, 3)) for c in colours]).astype(np.uint8)


def blocks_of(frames: np.ndarray, sizes=BLOCK_FRAMES) -> list[np.ndarray]:
    return np.split(frames, np.cumsum(sizes)[:-1])


def mean_error(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def assert_holds_exactly(path, appended: np.ndarray):
    """The file decodes to the appended frames, in order, at frame times i / FPS."""
    with av.open(str(path)) as container:
        decoded = [(frame.to_ndarray(format="rgb24"), frame.pts * frame.time_base) for frame in container.decode(video=0)]
    assert len(decoded) == len(appended)
    separations = [mean_error(a, b) for i, a in enumerate(appended) for b in appended[i + 1:]]
    assert min(separations) > 2 * TOLERANCE  # each frame is identifiable within the tolerance
    for index, (pixels, time) in enumerate(decoded):
        assert time == Fraction(index, FPS)
        assert mean_error(pixels, appended[index]) < TOLERANCE


@contextlib.contextmanager
def libav_warnings():
    """FFmpeg's warnings and errors (PyAV forwards them to the ``libav`` loggers) while the block runs."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("libav")
    previous_level = av.logging.get_level()
    logger.addHandler(handler)
    av.logging.set_level(av.logging.WARNING)
    try:
        yield records
    finally:
        av.logging.set_level(previous_level)
        logger.removeHandler(handler)


def test_libav_warnings_catches_a_packet_without_timestamps():
    """The capture the next tests rely on sees the muxer's timestamp warnings."""
    with libav_warnings() as warnings, av.open(io.BytesIO(), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(stream_frames(1)[0], format="rgb24")) + stream.encode(None):
            packet.pts = None
            container.mux(packet)
    assert any("Timestamps are unset" in record.getMessage() for record in warnings)


KILLED_AFTER_APPENDS = """
import os, signal, sys
import numpy as np
from selfforcing_core.recording import Mp4Recorder
recorder = Mp4Recorder(sys.argv[1], {width}, {height}, fps={fps})
frames = np.load(sys.argv[2])
for block in np.split(frames, np.cumsum([int(size) for size in sys.argv[3:]])[:-1]):
    recorder.append(block)
os.kill(os.getpid(), signal.SIGKILL)
"""

# The last block's append dies (SIGKILL) after writing the share argv[3] of its bytes to the file.
KILLED_WHILE_WRITING = """
import os, signal, sys
import numpy as np
from selfforcing_core.recording import Mp4Recorder

class KilledWhileWriting:
    def __init__(self, file, share):
        self.file, self.share = file, share
    def write(self, data):
        self.file.write(data[:int(len(data) * self.share)])
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    def __getattr__(self, name):
        return getattr(self.file, name)

recorder = Mp4Recorder(sys.argv[1], {width}, {height}, fps={fps})
frames = np.load(sys.argv[2])
blocks = np.split(frames, np.cumsum([int(size) for size in sys.argv[4:]])[:-1])
for block in blocks[:-1]:
    recorder.append(block)
recorder.file = KilledWhileWriting(recorder.file, float(sys.argv[3]))
recorder.append(blocks[-1])
"""


def run_killed(script: str, tmp_path, frames: np.ndarray, *arguments) -> Path:
    """Run ``script`` with (recording path, frame file, *arguments) in a new process, which must end
    killed by SIGKILL; returns the recording's path."""
    frame_file, path = tmp_path / "frames.npy", tmp_path / "record.mp4"
    np.save(frame_file, frames)
    script = script.format(width=WIDTH, height=HEIGHT, fps=FPS)
    result = subprocess.run([sys.executable, "-c", script, str(path), str(frame_file), *map(str, arguments)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return path


@pytest.mark.parametrize("appends", [1, 3])
def test_a_process_killed_right_after_append_leaves_every_appended_frame_in_order_on_the_timeline(tmp_path, appends):
    sizes = BLOCK_FRAMES[:appends]
    frames = stream_frames(sum(sizes))
    assert_holds_exactly(run_killed(KILLED_AFTER_APPENDS, tmp_path, frames, *sizes), frames)


@pytest.mark.parametrize("share", [0.001, 0.05, 0.5, 0.99, 1.0])
def test_a_process_killed_while_writing_a_block_leaves_a_clean_file_with_the_blocks_before(tmp_path, share):
    """Cut anywhere in the block's bytes (the moof header, the moof, the mdat, or all of it written
    but not yet made visible): the file decodes, without an error, to exactly the blocks before."""
    frames = stream_frames(sum(BLOCK_FRAMES))
    path = run_killed(KILLED_WHILE_WRITING, tmp_path, frames, share, *BLOCK_FRAMES)
    assert_holds_exactly(path, frames[:sum(BLOCK_FRAMES[:-1])])


def test_closed_recording_holds_every_frame_in_order_on_the_timeline_without_timestamp_warnings(tmp_path):
    frames = stream_frames(sum(BLOCK_FRAMES))
    path = tmp_path / "record.mp4"
    with libav_warnings() as warnings:
        recorder = Mp4Recorder(path, WIDTH, HEIGHT, fps=FPS)
        for block in blocks_of(frames):
            recorder.append(block)
        recorder.close()
    assert [record.getMessage() for record in warnings] == []
    assert_holds_exactly(path, frames)
    data = path.read_bytes()
    assert [kind for kind, *_ in boxes(data)] == ["ftyp", "moov"] + ["moof", "mdat"] * len(BLOCK_FRAMES)
    moofs = [(payload, end) for kind, _, payload, end in boxes(data) if kind == "moof"]
    sequence_numbers = [struct.unpack_from(">I", data, find_box(data, "mfhd", *moof)[0] + 4)[0] for moof in moofs]
    decode_times = [struct.unpack_from(">Q", data, find_box(data, "traf/tfdt", *moof)[0] + 4)[0] for moof in moofs]
    timescale = track_timescale(data)
    assert sequence_numbers == [1, 2, 3]  # one fragment per block, numbered on from the first
    assert [Fraction(time, timescale) for time in decode_times] == [Fraction(first, FPS) for first in (0, 5, 9)]


def test_boxes_reads_32_bit_64_bit_and_open_ended_sizes():
    """ISO BMFF box headers: size 1 takes the 64-bit size after the type, size 0 runs to the end."""
    data = (struct.pack(">I4s", 12, b"free") + b"abcd" + struct.pack(">I4sQ", 1, b"mdat", 20) + b"wxyz"
            + struct.pack(">I4s", 0, b"skip") + b"tail")
    assert list(boxes(data)) == [("free", 0, 8, 12), ("mdat", 12, 28, 32), ("skip", 32, 40, 44)]
    with pytest.raises(ValueError, match="does not fit"):
        list(boxes(data[:30]))


def test_every_block_has_the_first_blocks_codec_parameters(tmp_path):
    """Blocks of unlike content (noise, flat colour) get the same sample description (its avcC holds
    the SPS/PPS), so every block's fragments decode under the file's init segment."""
    recorder = Mp4Recorder(tmp_path / "record.mp4", WIDTH, HEIGHT, fps=FPS)
    noise = np.random.default_rng(0).integers(0, 256, (3, HEIGHT, WIDTH, 3), dtype=np.uint8)
    encoded = [recorder.encode_block(block) for block in (noise, stream_frames(6), noise[:1])]
    descriptions = [data[slice(*find_box(data, "moov/trak/mdia/minf/stbl/stsd"))] for data in encoded]
    assert b"avcC" in descriptions[0] and descriptions[0] == descriptions[1] == descriptions[2]
    for block in (noise, stream_frames(6)):
        recorder.append(block)
    recorder.close()


def test_a_block_whose_codec_parameters_differ_is_refused_and_the_file_keeps_the_blocks_before(tmp_path):
    path = tmp_path / "record.mp4"
    recorder = Mp4Recorder(path, WIDTH, HEIGHT, fps=FPS)
    recorder.append(stream_frames(4))
    before = path.read_bytes()
    other = Mp4Recorder(tmp_path / "other.mp4", WIDTH + 2, HEIGHT, fps=FPS)
    recorder.encode_block = lambda frames: other.encode_block(np.zeros((2, HEIGHT, WIDTH + 2, 3), np.uint8))
    with pytest.raises(RuntimeError, match="differs from the first block's"):
        recorder.append(stream_frames(2))
    assert path.read_bytes() == before
    recorder.close()
    other.close()
    assert_holds_exactly(path, stream_frames(4))


def test_an_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "record.mp4"
    path.write_bytes(b"someone's video")
    with pytest.raises(FileExistsError):
        Mp4Recorder(path, WIDTH, HEIGHT, fps=FPS)
    assert path.read_bytes() == b"someone's video"


def test_bad_frames_are_refused_with_the_expected_shape(tmp_path):
    recorder = Mp4Recorder(tmp_path / "record.mp4", WIDTH, HEIGHT, fps=FPS)
    with pytest.raises(ValueError, match=r"expected uint8 frames \[T, 48, 64, 3\]"):
        recorder.append(np.zeros((2, HEIGHT, WIDTH, 4), np.uint8))
    recorder.close()
    with pytest.raises(ValueError, match="even width and height"):
        Mp4Recorder(tmp_path / "odd.mp4", WIDTH + 1, HEIGHT)
