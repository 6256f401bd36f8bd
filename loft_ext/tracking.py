"""Where every number of a run goes: the run directory always, Accelerate's trackers (W&B) when on.

On disk (main process only): ``rounds.jsonl`` (one line per round), ``metrics.jsonl`` (one line per
epoch, with the evaluation), tables as ``<name>.json`` and images as PNG files. A run with W&B
disabled loses only the dashboard.

W&B goes through ``Accelerator(log_with="wandb")``: one experiment = one W&B group, ``job_type`` says
pretrain / prune / finetune, the step is the round index. Mode: ``WANDB_MODE`` when the user set
it, otherwise offline (runs land in ``<run_dir>/wandb`` and upload later with ``wandb sync``). Online
mode without credentials is refused before anything starts, so nothing ever prompts or waits on the
network.

A resumed pretraining continues its W&B run: the run id is kept in ``<run_dir>/wandb_run_id.txt`` and
reused with ``resume="allow"``. Online, the run goes on; offline, each segment is its own
``offline-run-*`` folder with the same id, and ``wandb sync`` uploads them into one run in the order
they started. Rounds logged after the checkpoint by the interrupted segment come again, with the same
values (resume is exact), from the resumed one.
"""
from __future__ import annotations

import json
import netrc
import os
import secrets
import string
from loft_ext.errors import ConfigError


WANDB_ID_FILE = "wandb_run_id.txt"


class TrackingError(ConfigError):
    """W&B asked to go online without credentials, or an unknown mode."""


WANDB_MODES = ("offline", "online", "disabled")


def resolve_wandb_mode(requested: str = "") -> str:
    """``requested`` or WANDB_MODE or offline; online needs WANDB_API_KEY or a netrc entry."""
    mode = requested or os.environ.get("WANDB_MODE", "") or "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in WANDB_MODES:
        raise TrackingError(f"unknown W&B mode {mode!r}; use one of {', '.join(WANDB_MODES)}")
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        try:
            has_netrc = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            has_netrc = False
        if not has_netrc:
            raise TrackingError("W&B online mode needs credentials: set WANDB_API_KEY (or run `wandb login`), "
                                "or use --wandb_mode offline and `wandb sync` later")
    return mode


def wandb_run_id(run_dir: str, resume: bool) -> tuple[str, bool]:
    """(id, continued): the id stored in ``run_dir`` when resuming and one was stored, else a new one
    (stored for a later resume). Main process only."""
    path = os.path.join(run_dir, WANDB_ID_FILE)
    if resume and os.path.exists(path):
        with open(path) as f:
            stored = f.read().strip()
        if stored:
            return stored, True
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    with open(path + ".tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id, False


def _flatten(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                out[f"{key}/{i}"] = v
        else:
            out[key] = value
    return out


class RunLogger:
    """Metrics, tables and images of one run; a no-op where ``run_dir`` is None (non-main ranks)."""

    def __init__(self, run_dir: str | None, accelerator=None, wandb: bool = False):
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.wandb = wandb and run_dir is not None
        self._files: dict[str, object] = {}

    def _file(self, kind: str):
        if kind not in self._files:
            name = "metrics.jsonl" if kind == "epoch" else f"{kind}s.jsonl"
            self._files[kind] = open(os.path.join(self.run_dir, name), "a")
        return self._files[kind]

    def log(self, values: dict, step: int, kind: str = "round") -> None:
        if self.run_dir is None:
            return
        f = self._file(kind)
        f.write(json.dumps({"step": step, **values}) + "\n")
        f.flush()
        if self.wandb:
            prefix = "epoch/" if kind == "epoch" else ""
            self.accelerator.log({prefix + k: v for k, v in _flatten(values).items()}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        if self.run_dir is None:
            return
        with open(os.path.join(self.run_dir, f"{key.replace('/', '_')}.json"), "w") as f:
            json.dump({"columns": columns, "rows": rows}, f)
        if self.wandb:
            import wandb

            self._wandb_run().log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, key: str, path: str, step: int) -> None:
        """``path`` is a PNG already written to the run directory."""
        if self.run_dir is None or not self.wandb:
            return
        import wandb

        self._wandb_run().log({key: wandb.Image(path)}, step=step)

    def _wandb_run(self):
        return self.accelerator.get_tracker("wandb", unwrap=True)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self.wandb:  # not accelerator.end_training(): it also destroys the process group
            for tracker in self.accelerator.trackers:
                tracker.finish()
