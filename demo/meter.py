"""Rolling frame statistics shared by the live paths: frame count, FPS, per-stage latency, FPS history.

Written from capture/inference threads and read by page refreshes and the stats route,
so every access takes the lock; the numbers are small, copies are cheap.
"""

from __future__ import annotations

import threading
import time
from collections import deque


class Meter:
    def __init__(self, window_s: float = 2.0, history_s: int = 120) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._ticks: deque[tuple[float, dict[str, float]]] = deque()
        self._history: deque[tuple[float, float]] = deque(maxlen=history_s)
        self._last_sample = 0.0
        self.frames = 0
        self.started = time.monotonic()

    def tick(self, timings: dict[str, float] | None = None) -> None:
        """One frame done; ``timings`` are its per-stage milliseconds."""
        now = time.monotonic()
        with self._lock:
            self.frames += 1
            self._ticks.append((now, dict(timings or {})))
            self._trim(now)
            # One history point per second is enough for a small chart.
            if now - self._last_sample >= 1.0:
                self._last_sample = now
                self._history.append((round(now - self.started, 1), self._fps(now)))

    def _trim(self, now: float) -> None:
        while self._ticks and now - self._ticks[0][0] > self.window_s:
            self._ticks.popleft()

    def _fps(self, now: float) -> float:
        if len(self._ticks) < 2:
            return 0.0
        span = max(now - self._ticks[0][0], 1e-6)
        # Frames completed within the window, over the window actually covered.
        return (len(self._ticks) - 1) / span if span > 0 else 0.0

    def snapshot(self) -> dict:
        """frames, fps (over the last window), mean latency per stage (ms), FPS history."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            fps = self._fps(now)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for _, timings in self._ticks:
                for stage, ms in timings.items():
                    sums[stage] = sums.get(stage, 0.0) + ms
                    counts[stage] = counts.get(stage, 0) + 1
            return {
                "frames": self.frames,
                "fps": round(fps, 2),
                # Each stage over the frames that went through it (a shared encode is skipped).
                "latency_ms": {stage: round(total / counts[stage], 2) for stage, total in sums.items()},
                "fps_history": list(self._history),
                "seconds": round(now - self.started, 1),
            }
