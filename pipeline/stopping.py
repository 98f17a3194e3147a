"""Stopping a long-running command cleanly on SIGTERM or SIGINT, also when Python drops the stop.

One home for `pneumo train` (pipeline/cli.py), `pneumo tune` (its launcher, workers and trials:
pipeline/study/tune.py) and the servers `pneumo ui` and `pneumo dashboard` start (pipeline/ui.py).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess


class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: stop cleanly. A KeyboardInterrupt, so every path that closes a run or a server
    on Ctrl-C (a training run ends KILLED, pipeline/study/train.py) closes it on preemption too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal


# The signal stop_on_signals caught, kept until its body ends (see raise_if_stopped).
_caught_signal: int | None = None


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM (systemd, Kubernetes, `docker stop`, Slurm and other batch schedulers on preemption) and SIGINT
    raise StopRequested in the main thread while the body runs. SIGINT is handled even when this process was
    started with it ignored (`nohup ... &` makes a background job ignore Ctrl-C and `kill -INT`).

    The signal is also remembered: Python runs a handler between any two bytecodes, finalisers and weakref
    callbacks included, and an exception raised there is printed as "Exception ignored" and dropped (seen in
    CI: SQLAlchemy's `InstanceState._cleanup` swallowed the stop, and a launch ran to the end and exited 0).
    `raise_if_stopped` raises it again at the checkpoints that poll it."""
    global _caught_signal

    def handler(signum, frame):
        global _caught_signal
        _caught_signal = signum
        raise StopRequested(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _caught_signal = None


def stop_pending() -> bool:
    """Whether stop_on_signals has caught a signal (its body is still running, stopping)."""
    return _caught_signal is not None


def raise_if_stopped() -> None:
    """Raise StopRequested if stop_on_signals caught a signal whose exception may have been swallowed, or
    replaced on its way out: TensorFlow's device scope raises RuntimeError("Exiting device scope without proper
    scope nesting") from its `__exit__` when the stop lands inside it (seen in CI: the trial was failed as an
    error, not queued again). Called in an `except` block, the replaced exception stays chained as context."""
    if _caught_signal is not None:
        raise StopRequested(_caught_signal)


def stop_check_callback():
    """A Keras callback that polls raise_if_stopped after every training and validation batch: a swallowed stop
    still ends training within a batch, through the same KeyboardInterrupt path as one that was not."""
    import keras  # here, not at the top: the servers stop with this module and never load Keras

    class StopCheck(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise_if_stopped()

        def on_test_batch_end(self, batch, logs=None):
            raise_if_stopped()

    return StopCheck()


def wait_stoppable(proc: subprocess.Popen) -> int:
    """`proc.wait()` in 0.5 s steps, so that a stop whose exception was dropped still ends the wait."""
    while True:
        raise_if_stopped()
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=0.5)
