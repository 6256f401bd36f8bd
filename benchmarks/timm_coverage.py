"""Coverage sweep: does the channel analysis split every timm model family exactly, or say why not?

Representatives (the rule, no hand-picked list): for every model module of ``timm.models`` (resnet,
efficientnet, cspnet, ...), the shortest registered model name (ties broken alphabetically: the
plainest name, usually the base model), passing over names with more than 60M parameters (counted
on the meta device; at most 8 tries). ``--per_prefix`` adds, per module, the representative of every name prefix (the leading letters of the name, after a vendor prefix such as ``tf_`` or
``legacy_``), e.g. mixnet and mnasnet next to efficientnet.

For each representative, at a small input (1, 3, 64, 64), preset ``all`` (``--preset one_dim_flops``, the
recipe's default, writes docs/results/timm_coverage-one_dim_flops.{json,md}; ``--preset one_dim`` ...-one_dim):

- ``split``: the number of split groups and channels, worker 0's parameter fraction at S=2 and S=4
  (round-robin dealing gives worker 0 the most units), and the exactness check of
  :mod:`loft_ext.partition.check` at S=2 and S=4 (each worker's sub-network equals the full model with
  the other workers' channels cut, eval mode with random BatchNorm statistics; every unit held by
  exactly one worker; an untrained round leaves the model unchanged);
- ``nothing``: the analysis ran but every channel group stays shared (the most common reasons);
- ``refused``: a :class:`PartitionError` (cannot be traced, does not run at that size, ...) and why;
- ``crash``: any other exception (the goal is none).

Outputs docs/results/timm_coverage.json (written after every model: re-running resumes) and
docs/results/timm_coverage.md. Run with ``make coverage`` (10 to 30 minutes on 2 CPU cores: the 171 models took 361 s of checks here) or
``python benchmarks/timm_coverage.py --models mixnet_s cspresnet50``.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from timm.models._registry import _model_to_module  # noqa: E402

from loft_ext.partition.check import check_plan  # noqa: E402
from loft_ext.partition.graph import NothingSplittable, PartitionError  # noqa: E402
from loft_ext.partition.plan import PRESETS, make_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (1, 3, 64, 64)
WORKERS = (2, 4)
VENDOR_PREFIXES = ("tf_", "legacy_", "gluon_", "ssl_", "swsl_", "ig_", "dm_", "timm_", "hf_", "fb_")


def name_prefix(name: str) -> str:
    for p in VENDOR_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
    m = re.match(r"[a-z]+", name)
    return m.group(0) if m else name


MAX_PARAMS = 60_000_000  # larger representatives are passed over for the next name (CPU time, memory)


def _rank(name: str) -> tuple[int, str]:
    """The rule: the shortest registered name (ties: alphabetical), the plainest, usually base model."""
    return (len(name), name)


def meta_params(name: str) -> int | None:
    try:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=10)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def _pick(names: list[str]) -> str | None:
    """The first name by :func:`_rank` with at most MAX_PARAMS parameters (counted on the meta device)."""
    for n in sorted(names, key=_rank)[:8]:
        count = meta_params(n)
        if count is not None and count <= MAX_PARAMS:
            return n
    return None


def representatives(per_prefix: bool = False) -> list[tuple[str, str]]:
    """[(module, model name)] by the rule in the module docstring."""
    by_module = defaultdict(list)
    for name in timm.list_models():
        by_module[_model_to_module[name]].append(name)
    firsts, extras = [], []  # the per-module ones first, so that a partial run covers every module
    for module in sorted(by_module):
        first = _pick(by_module[module])
        if first:
            firsts.append((module, first))
        if per_prefix:
            groups = defaultdict(list)
            for n in by_module[module]:
                groups[name_prefix(n)].append(n)
            for prefix, names in sorted(groups.items()):
                if first in names:
                    continue
                rep = _pick(names)
                if rep:
                    extras.append((module, rep))
    return firsts + extras


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = timm.get_pretrained_cfg(name, allow_unregistered=True) if hasattr(timm, "get_pretrained_cfg") else None
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        try:  # transformers with a fixed patch grid: build them for the small input
            return timm.create_model(name, num_classes=10, img_size=INPUT_SHAPE[-1])
        except Exception:
            pass
    return timm.create_model(name, num_classes=10)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run_one(name: str, module: str = "", timeout_s: int = 600, check_workers: tuple[int, ...] = WORKERS,
            preset: str = "all") -> dict:
    """Sweep one model; the record written to the JSON."""
    rec = {"model": name, "module": module or _model_to_module.get(name, ""), "status": None}
    t0 = time.time()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    try:
        model = build(name)
        total = sum(p.numel() for p in model.parameters())
        rec["params"] = total
        rec["batchnorm"] = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        rec["layernorm"] = any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
        rec["groupnorm"] = any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
        shape = INPUT_SHAPE
        try:
            try:
                plans = {S: make_plan(model, S, preset, shape, name) for S in WORKERS}
            except PartitionError as exc:
                if "does not run on an input" not in str(exc):
                    raise
                # a model that needs a larger input (fixed stride patterns, attention windows): its own size
                size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
                shape = (1, 3) + size[1:]
                rec["refused_at_64"] = str(exc)
                plans = {S: make_plan(model, S, preset, shape, name) for S in WORKERS}
        except NothingSplittable as exc:
            rec["status"], rec["reason"], rec["input"] = "nothing", str(exc), list(shape)
            return rec
        except PartitionError as exc:
            rec["status"], rec["reason"] = "refused", str(exc)
            return rec
        p2 = plans[2]
        rec["input"] = list(shape)
        rec["status"] = "split"
        rec["groups"] = len(p2.split)
        rec["channels"] = sum(g.channels for g in p2.split)
        rec["shared_groups"] = len(p2.shared)
        shared_ops = Counter(r for g in p2.shared for r in g.reasons if "along channels" in r)
        rec["channel_split_reasons"] = sorted(shared_ops)[:3]
        rec["fraction"] = {str(S): round(plans[S].worker_numel(model, 0) / total, 4) for S in WORKERS}
        if check_workers:
            failures = []
            for S in check_workers:
                failures += [f"S={S}: {f}" for f in check_plan(model, plans[S])]
            rec["exact"] = not failures
            rec["failures"] = failures
    except _Timeout:
        rec["status"], rec["reason"] = "timeout", f"took longer than {timeout_s} s"
    except PartitionError as exc:  # from the check's sub-network build, for instance
        rec["status"], rec["reason"] = "refused", str(exc)
    except Exception as exc:  # the goal: none of these
        rec["status"], rec["reason"] = "crash", first_line(exc)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        rec["seconds"] = round(time.time() - t0, 1)
    return rec


def _short(reason: str, n: int = 160) -> str:
    reason = reason.replace("|", "/").replace("\n", " ")
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def render(records: list[dict], complete: bool, preset: str = "all") -> str:
    by = Counter(r["status"] for r in records)
    bn = [r for r in records if r.get("batchnorm")]
    bn_split = [r for r in bn if r["status"] == "split"]
    inexact = [r for r in records if r["status"] == "split" and r.get("exact") is False]
    lines = [
        "# timm coverage of the channel analysis",
        "",
        f"Generated by `make coverage` (`benchmarks/timm_coverage.py{'' if preset == 'all' else ' --preset ' + preset}`), timm {timm.__version__}, "
        f"torch {torch.__version__}, input {INPUT_SHAPE} (a model that does not run at that size: its own "
        f"default size), preset `{preset}`. One representative per model "
        "module of `timm.models` and per name prefix within it: the shortest registered name with at most 60M parameters (rule in the script).",
        "" if complete else "\n**Partial run**: the sweep did not finish; the models below are those it reached.",
        "",
        f"- models: {len(records)}; split: {by['split']}; nothing splittable: {by['nothing']}; "
        f"refused: {by['refused']}; crashes: {by['crash']}; timeouts: {by['timeout']}",
        f"- exactness failures: {len(inexact)} (checked at S=2 and S=4 for every split model)",
        f"- families with BatchNorm that split something: {len(bn_split)}/{len(bn)}",
        "",
        "Columns: groups / channels split at S=2; fraction = worker 0's share of the parameters "
        "(shared tensors whole plus its share of every split one); exact = the sub-network check.",
        "",
        "| model | module | norm | status | groups | channels | frac S=2 | frac S=4 | exact | s | reason / notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: r["model"]):
        norm = "BN" if r.get("batchnorm") else "GN" if r.get("groupnorm") else "LN" if r.get("layernorm") else "-"
        frac = r.get("fraction", {})
        exact = "" if r["status"] != "split" else ("yes" if r.get("exact") else "NO")
        notes = r.get("reason", "") or "; ".join(r.get("failures", []) + r.get("channel_split_reasons", []))
        if r.get("input") and list(r["input"]) != list(INPUT_SHAPE):
            notes = f"input {r['input'][-1]}x{r['input'][-1]} (does not run at 64); " + notes
        lines.append(f"| {r['model']} | {r['module']} | {norm} | {r['status']} | {r.get('groups', '')} | "
                     f"{r.get('channels', '')} | {frac.get('2', '')} | {frac.get('4', '')} | {exact} | "
                     f"{r.get('seconds', '')} | {_short(notes)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", help="sweep these names instead of the representatives")
    ap.add_argument("--per_prefix", action="store_true", help="one representative per name prefix too")
    ap.add_argument("--preset", default="all", choices=PRESETS,
                    help="partition preset of every plan (all: the most splitting; one_dim_flops: the recipe's default)")
    ap.add_argument("--output", default="",
                    help="output path without extension (.json and .md are written; default "
                         "docs/results/timm_coverage, with -<preset> for a preset other than all)")
    ap.add_argument("--timeout_s", type=int, default=600, help="per-model limit")
    ap.add_argument("--fresh", action="store_true", help="ignore models already in the JSON")
    ap.add_argument("--redo_failed", action="store_true",
                    help="re-run the models of the JSON that crashed, timed out, were refused or failed the check")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    output = args.output or str(ROOT / "docs/results" / ("timm_coverage" + ("" if args.preset == "all"
                                                                              else f"-{args.preset}")))
    out_json, out_md = Path(output + ".json"), Path(output + ".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    if args.models:
        todo = [(_model_to_module.get(n, ""), n) for n in args.models]
    else:
        todo = representatives(args.per_prefix)
    done = {}
    if out_json.exists() and not args.fresh:
        done = {r["model"]: r for r in json.loads(out_json.read_text())["models"]}
        if args.redo_failed:
            done = {n: r for n, r in done.items()
                    if r["status"] not in ("crash", "timeout", "refused") and r.get("exact") is not False}
    print(f"{len(todo)} models, {len(done)} already done", flush=True)
    for i, (module, name) in enumerate(todo):
        if name in done:
            continue
        rec = run_one(name, module, args.timeout_s, preset=args.preset)
        done[name] = rec
        print(f"[{i + 1}/{len(todo)}] {name}: {rec['status']} {rec.get('groups', '')} "
              f"{rec.get('fraction', '')} exact={rec.get('exact', '')} {rec['seconds']}s "
              f"{_short(rec.get('reason', ''), 120)}", flush=True)
        records = [done[n] for _, n in todo if n in done]
        complete = len(records) == len(todo)
        out_json.write_text(json.dumps({"timm": timm.__version__, "input_shape": list(INPUT_SHAPE),
                                        "preset": args.preset, "complete": complete, "models": records}, indent=1))
        out_md.write_text(render(records, complete, args.preset))
    records = [done[n] for _, n in todo if n in done]
    bad = [r for r in records if r["status"] in ("crash", "timeout") or r.get("exact") is False]
    print(render(records, len(records) == len(todo), args.preset).split("| model |")[0])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
