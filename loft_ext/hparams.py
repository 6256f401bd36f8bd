"""Hyper-parameter dataclasses that generate their own command-line flags (open_lth style).

Every field of a ``Hparams`` dataclass becomes a ``--flag`` whose help text is the field's
``help`` metadata, so ``--help`` and docs/usage.md always list the same names. A run is
identified by a hash of its hparams (see :func:`hparams_hash`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from typing import Any, get_type_hints


_NO_LEGACY = object()


def field(default: Any, help: str, choices: tuple | None = None, legacy: Any = _NO_LEGACY):
    """A dataclass field with help text (and optional choices) for the CLI.

    ``legacy``: for a field added after runs were stored, the value that behaves as the code did before the
    field existed. :func:`hparams_hash` leaves the field out at that value, so earlier runs keep their
    directories (and benchmarks their cached runs); any other value is hashed as usual."""
    metadata = {"help": help, "choices": choices}
    if legacy is not _NO_LEGACY:
        metadata["legacy"] = legacy
    return dataclasses.field(default=default, metadata=metadata)


def _parse_float_tuple(text: str) -> tuple[float, ...]:
    text = text.strip()
    if not text:
        return ()
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as '0.5,0.75', got {text!r}") from None


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


@dataclasses.dataclass
class Hparams:
    """Base class: subclasses are dataclasses whose fields are made with :func:`field`."""

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        hints = get_type_hints(cls)
        group = parser.add_argument_group(cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            flag = "--" + f.name
            typ = hints[f.name]
            kwargs: dict[str, Any] = {"default": f.default, "dest": f.name}
            help_text = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if typ is bool or typ == "bool":
                kwargs.update(type=_parse_bool, metavar="BOOL", nargs="?", const=True)  # --flag == --flag true
            elif typ == tuple[float, ...]:
                kwargs["type"] = _parse_float_tuple
                kwargs["metavar"] = "X,Y,..."
            elif typ in (int, float, str):
                kwargs["type"] = typ
            elif typ == (int | None) or typ == (str | None) or typ == (float | None):
                inner = next(t for t in typ.__args__ if t is not type(None))
                kwargs["type"] = inner
            else:  # pragma: no cover - programming error, caught by tests of every Hparams class
                raise TypeError(f"unsupported hparam type {typ!r} for {cls.__name__}.{f.name}")
            if choices:
                kwargs["choices"] = choices
            default = f.default
            shown = ",".join(str(x) for x in default) if isinstance(default, tuple) else default
            kwargs["help"] = f"{help_text} (default: {shown})"
            group.add_argument(flag, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


def _hashed(h: Hparams) -> dict[str, Any]:
    return {f.name: getattr(h, f.name) for f in dataclasses.fields(h)
            if f.init and not ("legacy" in f.metadata and getattr(h, f.name) == f.metadata["legacy"])}


def hparams_hash(*hparams: Hparams) -> str:
    """A short stable hash of a set of hparams: the name of the run's directory. Every field counts (a changed
    default changes the hash of runs that use it, as it should), except a field at its ``legacy`` value."""
    payload = {type(h).__name__: _hashed(h) for h in hparams}
    blob = json.dumps(payload, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
