"""What a run tells its caller and hears from outside: the two ways training stops early (a non-finite loss,
a signal), the signal handler that turns SIGTERM / SIGINT into a stop at the next step boundary, and the
callbacks of the Python API (docs/reliability.md)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient went NaN or inf; the message names the step and the dataset rows."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training at a step boundary, after a checkpoint was saved there."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(
            f"{signal_name} received: stopped after step {step}, checkpoint saved to {checkpoint}"
        )
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopRequest:
    """Turns SIGTERM / SIGINT into a request that the loop honours at the next step boundary.

    The first signal only records the request and puts the previous handler back, so a second one
    acts as usual: Ctrl-C twice interrupts at once, a second SIGTERM terminates.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs handlers in the main thread only, and sets them only from there
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum, None) or signal.SIG_DFL)
        print(f"{self.signal_name}: saving a checkpoint at the end of this step, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

    def disarm(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)
        self._previous.clear()


class Callback:
    """Hooks into a run, for the Python API (``train(cfg, callbacks=[...])``); override what you need.

    They run on the main process only, between steps: a hook sees the state the loop has then.
    """

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """After each logged window of training metrics and after each evaluation."""

    def on_step_end(self, step: int, model: torch.nn.Module) -> None:
        """After each optimizer step (``model`` as prepared by Accelerate)."""

    def on_train_end(self, final_dir: Path) -> None:
        """Once ``final_dir`` holds the saved model."""
