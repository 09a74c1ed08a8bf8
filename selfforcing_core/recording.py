"""Recording a stream to an mp4 as it is generated, so a crash or a cancel keeps what was made.

    recorder = Mp4Recorder(path, width, height, fps=16)   # refuses to overwrite an existing file
    recorder.append(frames)                               # uint8 [T, H, W, 3], once per block
    recorder.close()

The file is a fragmented mp4 (one fragment per frame, flushed to disk as it is muxed): every
fragment written is playable without the index a normal mp4 writes at the end. The muxer closes a
fragment when the next frame arrives, so a hard crash loses the block being generated and the
last frame before it; ``close()`` (also on a cancel) writes everything.
"""
import numpy as np

MOVFLAGS = "frag_every_frame+empty_moov+default_base_moof"


class Mp4Recorder:
    """H.264 (libx264, low latency, yuv420p) frames appended to a new fragmented mp4 at ``path``."""

    def __init__(self, path, width: int, height: int, fps: int = 16):
        import av

        if width % 2 or height % 2:
            raise ValueError(f"recording needs an even width and height, got {width}x{height}")
        self.file = open(path, "xb")  # exclusive: an existing file is never overwritten
        self.container = av.open(self.file, "w", format="mp4", options={"movflags": MOVFLAGS, "flush_packets": "1"})
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = {"tune": "zerolatency", "preset": "veryfast", "crf": "18"}
        self.stream.thread_count = 1  # leave the cores to generation
        self.frames = 0

    def append(self, frames: np.ndarray):
        """frames: uint8 [T, H, W, 3] RGB."""
        import av

        for frame in frames:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self.container.mux(packet)
        self.frames += len(frames)
        self.file.flush()

    def close(self):
        """Flush the encoder and finish the file (idempotent)."""
        if self.container is None:
            return
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
            self.container.close()
        finally:
            self.container = None
            self.file.close()
