"""Steering a running stream from another thread: a new prompt, or a stop, taken at the next block boundary.

    steering = LiveSteering(encode)         # encode(text) -> [B, L, text_dim], run on the generating thread
    steering.request_prompt("a dog runs")   # any thread (e.g. a web request); answered at once
    steering.request_stop()                 # the stream ends after the block being generated
    video = generate_video(..., live=steering)
    steering.log                            # every switch and the stop, with the block it took effect at

A live switch is the prompt schedule's switch (``rollout.recache_prompt``) decided while the stream
runs: a prompt requested while block k - 1 is generated is taken at the start of block k, giving
exactly the stream of a schedule that switches at block k. Requests are refused with a
``LiveRequestError`` that says why (empty text, the stream is stopping, Stop sent twice).
"""
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch


class LiveRequestError(ValueError):
    """A live request that cannot be taken; the message names the problem and what to do."""


@dataclass
class LiveEvent:
    """One live request: kind "switch" (with its text) or "stop"; block / applied_at once taken."""

    kind: str
    text: str
    requested_at: float  # time.time() when it arrived
    block: int | None = None  # the block it took effect at: the first block under the new prompt / not generated
    applied_at: float | None = None


class LiveSteering:
    """Thread-safe live requests for one running stream."""

    def __init__(self, encode: Callable[[str], torch.Tensor]):
        self._encode = encode
        self._lock = threading.Lock()
        self._pending: LiveEvent | None = None
        self._stop: LiveEvent | None = None
        self.log: list[LiveEvent] = []

    def request_prompt(self, text: str) -> LiveEvent:
        """Switch to ``text`` at the next block boundary (a prompt not yet taken is replaced)."""
        text = (text or "").strip()
        if not text:
            raise LiveRequestError("the live prompt is empty; type what the video should show next")
        with self._lock:
            if self._stop is not None:
                raise LiveRequestError("the stream is stopping (Stop was pressed); queue the workflow again "
                                       "to continue with a new prompt")
            self._pending = LiveEvent("switch", text, time.time())
            return self._pending

    def request_stop(self) -> LiveEvent:
        """End the stream after the block being generated; what was generated is kept."""
        with self._lock:
            if self._stop is not None:
                raise LiveRequestError("Stop was already pressed; the stream ends after the current block")
            self._stop = LiveEvent("stop", "", time.time())
            return self._stop

    @property
    def stop_requested(self) -> bool:
        return self._stop is not None

    def take_prompt(self, block: int) -> torch.Tensor | None:
        """Called by the rollout before ``block``: the encoded pending prompt [B, L, text_dim], or None."""
        with self._lock:
            event, self._pending = self._pending, None
        if event is None:
            return None
        prompt = self._encode(event.text)
        event.block, event.applied_at = block, time.time()
        self.log.append(event)
        return prompt

    def take_stop(self, next_block: int) -> bool:
        """Called after each block: True (once) when the stream should end before ``next_block``."""
        with self._lock:
            event = self._stop
            if event is None or event.block is not None:
                return False
            event.block, event.applied_at = next_block, time.time()
        self.log.append(event)
        return True
