"""Recording a stream to an mp4 as it is generated, so a crash or a cancel keeps what was made.

    recorder = Mp4Recorder(path, width, height, fps=16)   # refuses to overwrite an existing file
    recorder.append(frames)                               # uint8 [T, H, W, 3], once per block
    recorder.close()

The file is a fragmented mp4 (ISO BMFF): an init segment (``ftyp`` + ``moov``: the track, its
timescale and the H.264 parameter sets) followed by one fragment (``moof`` + ``mdat``) per block.
Every block is encoded by its own libx264 encoder into its own in-memory fragmented mp4, which is
closed (encoder and muxer flushed); its fragment is then appended to the file. So when ``append``
returns, the block is on disk whole (fsynced) and the file up to it is playable: a crash, even a
killed process, loses at most the block being generated. ``close()`` only closes the file.

Appending is a two-step commit, so a crash while a block is written leaves a clean file too: the
fragment is written (and fsynced) with its ``moof`` typed ``free``, a box every reader skips, and
then made visible by rewriting those 4 bytes to ``moof``. A reader of a file cut anywhere in the
last block sees the blocks before it and, after them, a skipped box (or a cut-off one at the end).

Joining the blocks: each block's container starts its own timeline (fragment sequence number 1,
decode time 0; every frame's pts is its index in the block, in time base 1 / fps), and every block
starts with an IDR frame. A later block's fragment is appended with its ``mfhd`` sequence number
and ``tfdt`` decode time moved on to continue the file's (``default_base_moof`` keeps the sample
offsets relative to the ``moof``, so the bytes may move). A later block's init segment must equal
the first's (same codec parameter sets, timescale and track), else its fragment would not decode
under the file's: ``append`` refuses it.
"""
import io
import os
import struct
from fractions import Fraction

import numpy as np

MOVFLAGS = "frag_custom+empty_moov+default_base_moof"  # one fragment, written at close; sample offsets from its moof


def boxes(data, start: int = 0, end: int | None = None):
    """The ISO BMFF boxes laid end to end in ``data[start:end]``, as (type, start, payload start, end).

    A box header is a 32-bit big-endian size (of the whole box) and a 4-character type; size 1
    means a 64-bit size follows the type, size 0 means the box runs to ``end``."""
    end = len(data) if end is None else end
    while start < end:
        size, kind = struct.unpack_from(">I4s", data, start)
        payload = start + 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, payload)
            payload += 8
        elif size == 0:
            size = end - start
        if size < payload - start or start + size > end:
            raise ValueError(f"mp4 box {kind!r} at byte {start} has size {size}, which does not fit the {end - start} bytes left")
        yield kind.decode("latin-1"), start, payload, start + size
        start += size


def find_box(data, path: str, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """(payload start, end) of the first box at ``path`` ("moov/trak/mdia/mdhd") inside ``data[start:end]``."""
    first, _, rest = path.partition("/")
    for kind, _, payload, box_end in boxes(data, start, end):
        if kind == first:
            return find_box(data, rest, payload, box_end) if rest else (payload, box_end)
    raise ValueError(f"mp4 box {path!r} not found")


def track_timescale(init: bytes) -> int:
    """Time units per second of the (only) track, from ``moov/trak/mdia/mdhd`` (a full box: version,
    flags, creation and modification times, 32 or 64 bits each by version, then the timescale)."""
    payload, _ = find_box(init, "moov/trak/mdia/mdhd")
    version = init[payload]
    return struct.unpack_from(">I", init, payload + (20 if version == 1 else 12))[0]


def continue_fragment(moof: bytearray, sequence_offset: int, time_offset: int):
    """Move a ``moof`` box (edited in place) onto the file's timeline: its ``mfhd`` sequence number
    by ``sequence_offset`` and its track's ``tfdt`` base media decode time by ``time_offset`` units.

    Both are full boxes (1 byte version, 3 bytes flags); mfhd then holds a 32-bit sequence number,
    tfdt a 32-bit (version 0) or 64-bit (version 1) decode time."""
    mfhd, _ = find_box(moof, "moof/mfhd")
    struct.pack_into(">I", moof, mfhd + 4, struct.unpack_from(">I", moof, mfhd + 4)[0] + sequence_offset)
    tfdt, _ = find_box(moof, "moof/traf/tfdt")
    field = ">Q" if moof[tfdt] == 1 else ">I"
    decode_time = struct.unpack_from(field, moof, tfdt + 4)[0] + time_offset
    if field == ">I" and decode_time >= 2**32:
        raise ValueError(f"decode time {decode_time} does not fit a version-0 tfdt")
    struct.pack_into(field, moof, tfdt + 4, decode_time)


class Mp4Recorder:
    """H.264 (libx264, low latency, yuv420p) blocks appended to a new fragmented mp4 at ``path``."""

    def __init__(self, path, width: int, height: int, fps: int = 16):
        if width % 2 or height % 2:
            raise ValueError(f"recording needs an even width and height, got {width}x{height}")
        self.width, self.height, self.fps = width, height, fps
        self.file = open(path, "xb")  # exclusive: an existing file is never overwritten
        self.init = None  # the first block's ftyp + moov (the file's init segment)
        self.frame_duration = None  # track time units per frame: the track's timescale / fps
        self.blocks = 0  # fragments written (one per block)
        self.frames = 0

    def encode_block(self, frames: np.ndarray) -> bytes:
        """A whole fragmented mp4 of ``frames`` (uint8 [T, H, W, 3] RGB) from a new encoder, flushed."""
        import av

        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4", options={"movflags": MOVFLAGS}) as container:
            stream = container.add_stream("libx264", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.options = {"tune": "zerolatency", "preset": "veryfast", "crf": "18"}
            stream.thread_count = 1  # leave the cores to generation
            for index, pixels in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
                frame.pts, frame.time_base = index, Fraction(1, self.fps)  # the frame index in the block
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return buffer.getvalue()

    def append(self, frames: np.ndarray):
        """frames: uint8 [T, H, W, 3] RGB. On disk (fsynced) and visible to readers when this returns."""
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [T, {self.height}, {self.width}, 3], got {frames.dtype} {list(frames.shape)}")
        if not len(frames):
            return
        data = self.encode_block(frames)
        found = [(kind, data[start:end]) for kind, start, _, end in boxes(data)]
        if [kind for kind, _ in found[:4]] != ["ftyp", "moov", "moof", "mdat"]:
            raise RuntimeError(f"expected ftyp, moov, moof, mdat (one fragment) in the block's mp4, got {[kind for kind, _ in found]}")
        (_, ftyp), (_, moov), (_, moof), (_, mdat) = found[:4]  # the trailing mfra (an index into these bytes) is dropped
        init, head = ftyp + moov, b""
        if self.init is None:
            timescale = track_timescale(init)
            if timescale % self.fps:
                raise ValueError(f"track timescale {timescale} is not a multiple of {self.fps} fps")
            self.init, self.frame_duration, head = init, timescale // self.fps, init
        elif init != self.init:
            raise RuntimeError("the block's mp4 init segment (codec parameter sets, timescale or track) differs "
                               "from the first block's: its frames would not decode in this file")
        moof = bytearray(moof)
        continue_fragment(moof, self.blocks, self.frames * self.frame_duration)
        moof[4:8] = b"free"  # hidden from readers until the whole fragment is on disk
        moof_type = self.file.tell() + len(head) + 4
        self.file.write(head + moof + mdat)
        self.file.flush()
        os.fsync(self.file.fileno())
        os.pwrite(self.file.fileno(), b"moof", moof_type)  # commit: one 4-byte write
        os.fsync(self.file.fileno())
        self.blocks += 1
        self.frames += len(frames)

    def close(self):
        """Close the file (idempotent): every block is already in it."""
        self.file.close()
