"""The loss-spike guard: skip a step whose loss spikes, roll back when spikes repeat.

With ``train.spike_factor`` > 0, every optimizer step's loss (the mean over all ranks and
micro-batches, known before the update) is compared with the median of the last
``train.spike_window`` applied steps' losses. A step whose loss exceeds ``spike_factor`` × that
median (once ``MIN_HISTORY`` steps are known), or is not finite, is **not applied**: the optimizer
fpm built is told to skip its update (:class:`StepGate`; DeepSpeed's wrappers around it copy back
unchanged master weights), the learning-rate schedule moves on, and the step is counted. When
``train.spike_rollback`` such steps fall within ``spike_window`` steps, the run **rolls back** to
its last checkpoint and skips the data window from the first to the last of those spikes: the data
stream is a pure function of the *data* step, and the guard keeps the list of skipped data windows
(``data_step``), saved with every checkpoint, so a resumed run reads what the uninterrupted one
reads. Decisions depend only on logged losses and the saved state: deterministic and resumable.

None of the anchors skips and rolls back by itself (Megatron-LM's spike check is experimental;
llm-foundry's callback detects and stops).
"""

from __future__ import annotations

import math
from collections import deque

MIN_HISTORY = 10  # applied steps needed before a loss can be called a spike


class StepGate:
    """Makes an optimizer's ``step`` a no-op while ``skip`` is set (patched on the instance, so
    DeepSpeed's wrappers, which call ``optimizer.step()``, are gated too)."""

    def __init__(self, optimizer):
        self.skip = False
        inner = optimizer.step

        def step(*args, **kwargs):
            if self.skip:
                return None
            return inner(*args, **kwargs)

        optimizer.step = step


class SpikeGuard:
    def __init__(self, factor: float, window: int, rollback: int):
        self.factor, self.window, self.rollback = factor, window, rollback
        self.history: deque[float] = deque(maxlen=window)  # losses of applied steps
        self.recent: deque[int] = deque()  # data steps of recent spikes (within `window` steps)
        self.skips: list[list[int]] = []  # skipped data windows [first, last], sorted
        self.skipped = 0  # steps not applied, over the run
        self.rollbacks = 0

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def data_step(self, step: int) -> int:
        """The data step the trainer's step ``step`` (0-based) reads: steps inside a skipped window
        are passed over."""
        d = step
        for first, last in self.skips:
            if d >= first:
                d += last - first + 1
        return d

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if len(self.history) < MIN_HISTORY:
            return False
        ordered = sorted(self.history)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        return loss > self.factor * median

    def observe(self, step: int, loss: float) -> bool:
        """Record trainer step ``step``'s (0-based) loss; True if the step must not be applied."""
        if not self.is_spike(loss):
            self.history.append(loss)
            return False
        self.skipped += 1
        d = self.data_step(step)
        self.recent.append(d)
        while self.recent and self.recent[0] <= d - self.window:
            self.recent.popleft()
        return True

    def wants_rollback(self) -> bool:
        return self.rollback > 0 and len(self.recent) >= self.rollback

    def roll_back(self, restored: dict | None, back: int) -> tuple[int, int]:
        """Return to the guard state of the checkpoint of step ``back`` (``restored``; the counts of
        this run are kept) and skip the data window of the recent spikes that came after it (those
        before it were not applied anyway). Returns the skipped window of data steps."""
        start = self.data_step(back)
        after = [d for d in self.recent if d >= start] or [self.recent[-1]]
        window = (after[0], after[-1])
        skipped, rollbacks, skips = self.skipped, self.rollbacks + 1, self.skips
        self.load_state(restored)
        self.skipped, self.rollbacks = skipped, rollbacks
        self.skips = sorted(set(map(tuple, skips)) | {window})
        self.skips = [list(w) for w in self.skips]
        self.recent.clear()
        return window

    def state(self) -> dict:
        return {"history": list(self.history), "recent": list(self.recent), "skips": self.skips,
                "skipped": self.skipped, "rollbacks": self.rollbacks}

    def load_state(self, state: dict | None) -> None:
        state = state or {}
        self.history = deque(state.get("history", []), maxlen=self.window)
        self.recent = deque(state.get("recent", []))
        self.skips = [list(w) for w in state.get("skips", [])]
        self.skipped = int(state.get("skipped", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
