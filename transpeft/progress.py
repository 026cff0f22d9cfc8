"""Progress of long loops: a live bar on a terminal, a line now and then everywhere else.

A bar redraws itself with carriage returns. In a log file, CI output or the Prefect UI every frame
is kept: one per training step, tens of thousands of characters for one adapter. So where stderr
is not a terminal, ``progress`` prints a line every ``every_s`` seconds or every 10 % instead, with
the step, what the loop reports (``set_postfix(loss=...)``) and the rate:

    train: step 60/200 (30%), loss 1.234, 4.1 step/s
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

# At most this long between two lines, whatever the share done. A tenth of a loop comes sooner than this
# for nearly every loop of the demo; a base's pretraining (minutes) at 10 s wrote more lines than all
# the rest of `make demo` together, without saying more.
EVERY_S = 30.0


def progress(iterable: Iterable, desc: str, unit: str = "step", enabled: bool = True, total: int | None = None):
    """``iterable``, showing its progress on stderr: tqdm's bar on a terminal, ``Lines`` elsewhere.

    Either way the result is iterated, used as a context manager and given ``set_postfix``."""
    if not enabled or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not enabled, leave=False)
    return Lines(iterable, desc, unit, total)


def without_library_bars():
    """Turns off transformers' own bars: one over the tensors of every model loaded, one over the shards of
    every model saved. They last a fraction of a second here and, outside a terminal, leave a frame per
    tensor in the log; the long steps have bars of their own, from ``progress``. Outside a terminal
    MLflow's bar over an artifact download goes too (a worker's log held a few frames per adapter
    fetched); it reads its switch from the environment at each download, so the switch is set there."""
    hf_logging.disable_progress_bar()
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class Lines:
    """A loop's progress as plain lines on stderr: after every tenth of ``total`` or ``every_s`` seconds,
    whichever comes first, and at its end."""

    def __init__(self, iterable: Iterable, desc: str, unit: str = "step", total: int | None = None,
                 every_s: float = EVERY_S, stream=None):
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{name} {value}" for name, value in values.items())

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __iter__(self):
        started = last = time.perf_counter()
        tenths_shown, done = 0, 0
        for done, item in enumerate(self.iterable, 1):
            yield item  # the loop's body runs here, and may set the postfix for this step
            now = time.perf_counter()
            tenths = done * 10 // self.total if self.total else 0
            if tenths > tenths_shown or now - last >= self.every_s or done == self.total:
                self._line(done, now - started)
                tenths_shown, last = tenths, now
        if done and done != self.total:  # an iterable of unknown length, or one that ended early
            self._line(done, time.perf_counter() - started)

    def _line(self, done: int, seconds: float) -> None:
        where = f"{done}/{self.total} ({done * 100 // self.total}%)" if self.total else str(done)
        rate = f"{done / seconds:.1f} {self.unit}/s" if seconds > 0 else ""
        fields = ", ".join(filter(None, [f"{self.unit} {where}", self.postfix, rate]))
        print(f"{self.desc}: {fields}", file=self.stream or sys.stderr, flush=True)
