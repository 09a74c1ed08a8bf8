"""Live recording cost: seconds per ``Mp4Recorder.append`` of a block (its own libx264 encoder,
one thread, then the write, fsync, commit and fsync), at the samplers' block sizes (9 frames, then
12), and of its encoding alone.

The frames are a moving colour field with film-grain noise (a stand-in for decoded video: H.264's
cost grows with the detail it has to keep). Prints the median and the slowest append, the bytes per
frame, and the share of the stream's own time (a block of 12 frames lasts 0.75 s at 16 fps).

    .venv/bin/python -m benchmarks.bench_recording [--width 832 --height 480] [--blocks 12]
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from selfforcing_core.recording import Mp4Recorder

FPS = 16


def block_frames(first_frame: int, count: int, width: int, height: int, rng) -> np.ndarray:
    """uint8 [count, H, W, 3]: colour waves drifting across the frame, plus noise of +-8 levels."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in range(first_frame, first_frame + count):
        channels = [np.sin(x / (37 + 11 * c) + y / (53 - 7 * c) + t * (0.2 + 0.05 * c)) for c in range(3)]
        frame = 128 + 100 * np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3))
        frames.append(frame.clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--blocks", type=int, default=12, help="blocks appended (the first has 9 frames, the rest 12)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sizes = [9] + [12] * (args.blocks - 1)
    blocks, first = [], 0
    for size in sizes:
        blocks.append(block_frames(first, size, args.width, args.height, rng))
        first += size
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "record.mp4")
        recorder = Mp4Recorder(path, args.width, args.height, fps=FPS)
        seconds, encoding = [], []
        for block in blocks:
            start = time.perf_counter()
            recorder.append(block)
            seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            recorder.encode_block(block)  # the same block again, encoding alone (in memory)
            encoding.append(time.perf_counter() - start)
        recorder.close()
        size = os.path.getsize(path)
    later = seconds[1:] or seconds
    print(f"{args.width}x{args.height}, {len(blocks)} blocks ({sum(sizes)} frames), libx264 veryfast crf 18, 1 thread")
    print(f"append per 12-frame block: median {statistics.median(later):.3f} s, slowest {max(later):.3f} s "
          f"({statistics.median(later) / (12 / FPS):.0%} of the block's 0.75 s of video); first block (9 frames) {seconds[0]:.3f} s")
    print(f"of which encoding (in memory, median): {statistics.median(encoding[1:] or encoding):.3f} s; "
          f"file: {size / sum(sizes) / 1e3:.1f} kB per frame")


if __name__ == "__main__":
    main()
