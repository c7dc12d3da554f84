"""Stopping a run on SIGTERM / SIGINT: at once before the first training step, else after the current step
with a checkpoint (`--resume` continues it)."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import numpy as np

log = logging.getLogger("effnet_jax.train")


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped the run after saving checkpoints/latest; `--resume` continues it."""

    def __init__(self, step: int, epoch: int, checkpoint: pathlib.Path, signum: int | None = None):
        self.exit_code = 128 + (signum or 15)  # the shell's convention for a process ended by that signal
        super().__init__(f"interrupted at step {step} (epoch {epoch}); checkpoint saved in {checkpoint}; continue "
                         "with the same flags and --resume")


class StoppedBeforeTraining(BaseException):
    """SIGTERM/SIGINT arrived before the first training step (while the data or the weights load, a tfds download
    retries, ...): there is nothing to save, so the run stops at once. A BaseException, as KeyboardInterrupt, so
    that the loaders' `except Exception` clauses do not take it for a failed read."""

    def __init__(self, signum: int):
        import signal
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} before the first training step; nothing to save")


class StopRequest:
    """Catches SIGTERM and SIGINT (main thread only). Before `start_training()` a signal raises
    `StoppedBeforeTraining` at once (nothing to save yet); from then on the loop saves a checkpoint and stops
    between two steps; a second signal acts as usual. With several processes the decision is taken together
    (`requested(check_all=True)` gathers every process's flag) so that all save the same step."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal: int | None = None
        self.training = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal
        if self.signal is not None:  # the second one: as without us
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal = signum
        if not self.training:
            raise StoppedBeforeTraining(signum)
        log.warning("%s received: saving a checkpoint after this step, then stopping (again to stop at once)",
                    signal.Signals(signum).name)

    def start_training(self) -> None:
        """From here on a signal saves a checkpoint after the current step instead of stopping at once."""
        self.training = True
        log.info("training: SIGTERM or Ctrl-C now saves a checkpoint after the current step, then stops")

    def requested(self, check_all: bool) -> bool:
        if jax.process_count() == 1:
            return self.signal is not None
        if not check_all:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
        return bool(np.any(flags))

    def __exit__(self, *exc) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
