"""Ctrl-C as a request to stop between frames, so that a video and its detections file end at the same frame.

A ``KeyboardInterrupt`` can land anywhere, between writing a frame and writing its line too; a flag checked
between frames cannot. The first Ctrl-C sets the flag and gives Ctrl-C back its usual meaning, so a second one
interrupts at once (a stream that stopped sending, say).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class StopOnCtrlC:
    """``with StopOnCtrlC() as stop:`` ... ``if stop.requested: break``. Outside the main thread, where Python
    takes no signal handlers, Ctrl-C stays a ``KeyboardInterrupt``."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def request(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __enter__(self) -> StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
                 ) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
