"""One error hierarchy for loft_ext, and how a program's top level reports it.

Every error loft_ext raises on purpose derives from `LoftError`: a user catches one class. Bad input
(`ConfigError` and the module errors that subclass it) means nothing ran or nothing was overwritten;
`TrainingFailure` means a run started and stopped (the last checkpoint is kept); `Preempted` is a
clean stop at a round boundary with a checkpoint to resume from.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback


class LoftError(Exception):
    """Base of every error loft_ext raises on purpose; the message names the problem and the fix."""


class ConfigError(LoftError, ValueError):
    """Input that cannot work (flags, data, model, checkpoint); the message says which and what would work."""


class TrainingFailure(LoftError, RuntimeError):
    """The run cannot go on (non-finite values, a lost rank); the message names where and why."""


class PluginError(TrainingFailure):
    """A plugin raised inside an event; the message names the plugin, the event and the round."""


class Preempted(LoftError):
    """The run was stopped by SIGTERM/SIGINT at a round boundary, with a checkpoint to resume from."""

    def __init__(self, signum: int, rounds_done: int, checkpoint: str | None):
        self.signum, self.rounds_done, self.checkpoint = signum, rounds_done, checkpoint
        super().__init__(f"preempted by {signal.Signals(signum).name} after round {rounds_done}: checkpoint "
                         f"{checkpoint}; run the same command with --resume latest to continue")


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (multi-line messages are joined with ' | ')."""
    text = str(exc).strip() or type(exc).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def write_traceback(exc: BaseException, output_dir: str | None) -> str | None:
    """Write the traceback of an unexpected error to <output_dir>/errors/<time>-rank<r>.log; its path."""
    rank = os.environ.get("RANK", "0")
    directory = os.path.join(output_dir or ".", "errors")
    try:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{time.strftime('%Y%m%d-%H%M%S')}-rank{rank}.log")
        with open(path, "w") as f:
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return path
    except OSError:
        return None


def report_failure(exc: BaseException, output_dir: str | None = None) -> int:
    """Print `exc` as one line on stderr and return the exit status a recipe should end with.

    2: bad input (nothing ran or nothing was overwritten); 1: the run failed (checkpoint kept) or an
    unexpected error (its traceback goes to a file, whose path the line names); 128+N: preempted by N.
    """
    if isinstance(exc, Preempted):
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    if isinstance(exc, TrainingFailure):
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    if isinstance(exc, LoftError):
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    path = write_traceback(exc, output_dir)
    where = f"; traceback in {path}" if path else ""
    print(f"error: unexpected {type(exc).__name__}: {one_line(exc)}{where}", file=sys.stderr)
    return 1
