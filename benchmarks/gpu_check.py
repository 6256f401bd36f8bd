"""GPU check: one short, robust run on a lent GPU (docs/results.md, "GPU check").

Measures and checks, each section isolated so that a failure is recorded and the rest still runs:

- ``env``: the card (name, capability, memory, driver, CUDA, cuDNN) and the torch / timm / deepspeed versions.
- ``identity``: slice-then-write-back is the identity for resnet18 at S=2 and S=4 on CUDA tensors, bit for
  bit, and a write-back into a blank (NaN) model restores exactly the entries some worker holds
  (tests/test_subnet.py on CUDA).
- ``s1_equals_sgd``: a LoFT run with S=1 equals plain SGD on CUDA in fp32 (TF32 off), momentum 0 with
  ``reset`` and 0.9 with ``carry``, with cuDNN's default algorithms and again under
  ``torch.use_deterministic_algorithms`` (tests/test_engine.py on CUDA): with the default algorithms within 1e-5
  of the model's norm (plain SGD rerun against itself gives the noise floor), deterministic: bit for bit.
- ``bf16_rounds``: LoFT rounds with S=2 under bf16 autocast in channels_last (the recipe's ``--mixed_precision
  bf16 --channels_last``) keep every tensor finite and the layout in the sub-networks, and the loss falls on
  a fixed synthetic batch set.
- ``fsdp_bf16``: LoFT rounds with worker 0 as the FSDP2-sharded copy of ``--replicas fsdp --mixed_precision
  bf16`` on a one-rank mesh over NCCL: bf16 forward, fp32 shards and gradients, the round's slices loaded into
  the shards exactly, finite, the loss falls; step time and peak memory of that worker vs a plain one.
- ``ds_<config>``: for ds_configs/zero0_fp32_cpu.json, zero1_fp32_cpu.json, zero1_bf16_gpu.json,
  zero3_fp32_cpu.json and zero3_bf16_gpu.json, one process (world size 1, NCCL), ``LoftMPU`` over
  ``build_grid(1)``, worker 0 of an S=2 plan wrapped by ``ds.initialize`` inside a ``LoFTEngine`` (worker 1
  plain torch), exactly as the runner wires it (ZeRO-3: the engine wraps the partitioned copy of
  ``ds.ZeroThreeReplica``, pushed after each load and pulled before each sync): at every round start the
  module holds the round's slices of the assembled model and DeepSpeed's fp32 master copy
  (``safe_get_full_fp32_param``) equals them after the push; the next step updates from those values
  (compared with a plain-torch step from the same values).
- ``throughput_<model>``: resnet18 / resnet50, bf16 autocast and channels_last, dense vs the S=2 / S=4
  sub-networks (worker 0): images per second per worker for training steps (forward, backward, SGD step)
  and peak CUDA memory per row, with the ratios sub-network / dense.

Synthetic CIFAR-shaped data (3x32x32, 10 classes, made on the device); models ``pretrained=False``;
nothing is read or downloaded. Every section runs in a child process with a time limit; a child that
crashes or hangs is recorded and the remaining sections run in a fresh child.

    python benchmarks/gpu_check.py [--out DIR] [--budget 240] [--only identity,ds_zero1_bf16_gpu]
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/x     # every section it can, tiny, on CPU

Writes ``results.json`` (every number), ``results.md`` (the tables, also printed) and ``children.log``
(the children's output) to ``--out`` (default ``$OUT`` if set, else benchmarks/results/gpu_check/).
``benchmarks/gpu_check.sh`` is the wrapper a device session runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# item -> (group, hard limit in s on a GPU, hard limit in s in --cpu-smoke). The hard limit only stops a
# hang; expected times on an H100 are a few seconds per check and ~30 s per throughput model.
ITEMS = {
    "env": ("checks", 30, 30),
    "identity": ("checks", 45, 45),
    "s1_equals_sgd": ("checks", 60, 60),
    "bf16_rounds": ("checks", 45, 60),
    "fsdp_bf16": ("checks", 60, 90),
    "ds_zero0_fp32_cpu": ("deepspeed", 90, 60),
    "ds_zero1_fp32_cpu": ("deepspeed", 60, 60),
    "ds_zero1_bf16_gpu": ("deepspeed", 60, 60),
    "ds_zero3_fp32_cpu": ("deepspeed", 60, 60),
    "ds_zero3_bf16_gpu": ("deepspeed", 60, 60),
    "throughput_resnet18": ("throughput", 75, 45),
    "throughput_resnet50": ("throughput", 100, 60),
}
GROUPS = ["checks", "deepspeed", "throughput"]
DS_CONFIGS = {"ds_zero0_fp32_cpu": "zero0_fp32_cpu.json", "ds_zero1_fp32_cpu": "zero1_fp32_cpu.json",
              "ds_zero1_bf16_gpu": "zero1_bf16_gpu.json", "ds_zero3_fp32_cpu": "zero3_fp32_cpu.json",
              "ds_zero3_bf16_gpu": "zero3_bf16_gpu.json"}
CHILD_STARTUP_S = 45  # python + torch + timm + CUDA context, generous
# what each group is expected to take on an H100 (s): time kept free for the later groups
EXPECTED_S = {"checks": 40, "deepspeed": 45, "throughput": 90}


# ==================================================================================================== parent
def _out_dir(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    return os.path.join(ROOT, "benchmarks", "results", "gpu_check")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _host_info() -> dict:
    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "hostname": platform.node()}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout
        info["git_dirty_files"] = [ln[3:] for ln in dirty.splitlines()]
    except (OSError, subprocess.SubprocessError) as exc:
        info["git_commit"] = f"unavailable ({exc})"
    env_keys = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "DS_BUILD_OPS", "DS_ACCELERATOR", "PYTHONPATH",
                "HF_HUB_OFFLINE", "NCCL_DEBUG")
    info["env"] = {k: os.environ.get(k) for k in env_keys if os.environ.get(k) is not None}
    return info


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _collect(work, pending, results, reported, exit_info, t0) -> list[str]:
    """Copy the children's section records into ``results``; returns the sections that started. With
    ``exit_info`` (rc, killed) a section still marked running is the one the child died in."""
    started = []
    for item in pending:
        rec = _read_json(os.path.join(work, f"{item}.json"))
        if rec is None:
            continue
        started.append(item)
        if rec.get("status") == "running":
            if exit_info is None:
                continue
            rc, killed = exit_info
            why = "parent's time limit" if killed else f"child exited with code {rc}"
            rec["status"] = "timeout" if killed else "crashed"
            rec["reason"] = f"{why} during this section; log tail in launches"
            rec["seconds"] = round(time.time() - rec.get("started", t0), 1)
        results["sections"][item] = rec
        if item not in reported:
            reported.add(item)
            print(f"  {item}: {rec['status']} ({rec.get('seconds', '?')} s)", flush=True)
    return started


def _write_children_log(out, work, results) -> None:
    with open(os.path.join(out, "children.log"), "w") as f:
        for launch in results["launches"]:
            f.write(f"===== {launch['group']} try {launch['attempt']}: {', '.join(launch['items'])} "
                    f"(rc {launch['rc']}, {launch['seconds']} s)\n")
            f.write(_tail(os.path.join(work, launch["log"]), 4_000_000))


def run_parent(args) -> int:
    t_start = time.time()
    out = os.path.abspath(_out_dir(args.out))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_check-")
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    budget = args.budget or (150.0 if args.cpu_smoke else 240.0)
    deadline = t_start + budget
    wanted = [i for i in ITEMS if not args.only or i in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(ITEMS) if args.only else set()
    if unknown:
        print(f"unknown sections {sorted(unknown)}; choose from {', '.join(ITEMS)}", file=sys.stderr)
        return 2
    results = {"tool": "benchmarks/gpu_check.py", "mode": mode, "started": _now(), "budget_s": budget,
               "argv": sys.argv[1:], "out_dir": out, "host": _host_info(), "sections": {}, "launches": []}
    res_path = os.path.join(out, "results.json")
    print(f"gpu_check ({mode}): sections {', '.join(wanted)}; budget {budget:.0f} s; output {out}", flush=True)

    # on a GPU each group runs in its own child (a hang in DeepSpeed/NCCL cannot take the other groups with
    # it); --cpu-smoke runs them in one child (each child pays ~5 s of imports on a small CPU) unless --isolate
    groups = ["all"] if args.cpu_smoke and not args.isolate else GROUPS
    members = {g: [i for i in wanted if g == "all" or ITEMS[i][0] == g] for g in groups}
    for gi, group in enumerate(groups):
        pending = list(members[group])
        attempt = 0
        while pending:
            # keep what the later groups are expected to need (not their hard limits) out of this group's time
            reserve = 0 if args.cpu_smoke else sum(EXPECTED_S[g] for g in groups[gi + 1:] if members[g])
            remaining = deadline - time.time() - reserve
            if remaining < (8 if args.cpu_smoke else 20):
                for item in pending:
                    results["sections"][item] = {"status": "not_run",
                                                 "reason": f"time budget of {budget:.0f} s used up"}
                break
            attempt += 1
            limits = [ITEMS[i][2 if args.cpu_smoke else 1] for i in pending]
            timeout = min(remaining, CHILD_STARTUP_S + sum(limits))
            log = os.path.join(work, f"{group}-{attempt}.log")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--items", ",".join(pending),
                   "--workdir", work, "--deadline", str(time.time() + timeout - 2)]
            if args.cpu_smoke:
                cmd.append("--cpu-smoke")
            if args.force_gpu_configs:
                cmd.append("--force-gpu-configs")
            if args.simulate:
                cmd += ["--simulate", args.simulate]
            if args.batches:
                cmd += ["--batches", args.batches]
            cmd += ["--image_size", str(args.image_size)]
            env = dict(os.environ)
            if group in ("checks", "all"):  # deterministic cuBLAS for the determinism variant of s1_equals_sgd
                env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            print(f"[{time.time() - t_start:6.1f}s] {group} (try {attempt}): {', '.join(pending)} "
                  f"(limit {timeout:.0f} s)", flush=True)
            t0 = time.time()
            launch = {"group": group, "attempt": attempt, "items": list(pending), "rc": None,
                      "killed_at_limit": False, "seconds": None, "log": os.path.basename(log)}
            results["launches"].append(launch)
            reported = set()
            with open(log, "w") as logf:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                        start_new_session=True)
                while True:
                    try:
                        rc = proc.wait(timeout=2)
                        break
                    except subprocess.TimeoutExpired:
                        if time.time() - t0 > timeout:
                            os.killpg(proc.pid, signal.SIGKILL)  # the child we started and its own children
                            rc = proc.wait()
                            launch["killed_at_limit"] = True
                            break
                    # finished sections reach results.json at once: a run killed from outside keeps them
                    n_reported = len(reported)
                    _collect(work, pending, results, reported, None, t0)
                    if len(reported) > n_reported:
                        _write_json(res_path, results)
            launch.update(rc=rc, seconds=round(time.time() - t0, 1))
            started = _collect(work, pending, results, reported, (rc, launch["killed_at_limit"]), t0)
            if rc != 0:
                launch["log_tail"] = _tail(log)
            if not started:  # the child could not even start its first section: no point in retrying
                last = ([ln for ln in _tail(log).splitlines() if ln.strip()] or ["no output"])[-1][:300]
                for item in pending:
                    results["sections"][item] = {"status": "error",
                                                 "reason": f"child exited with code {rc} before this section "
                                                           f"started: {last}"}
                pending = []
            pending = [i for i in pending if i not in started]
            results["wall_s"] = round(time.time() - t_start, 1)
            _write_json(res_path, results)
            _write_children_log(out, work, results)

    results["finished"] = _now()
    results["wall_s"] = round(time.time() - t_start, 1)
    results["summary"] = _summary(results)
    _write_json(res_path, results)
    _write_children_log(out, work, results)
    shutil.rmtree(work, ignore_errors=True)  # the children's records and logs are in results.json / children.log
    md = render_markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print()
    print(md, flush=True)
    s = results["summary"]
    return 0 if not s["failed"] and not s["error"] else 1


def _summary(results) -> dict:
    by = {}
    for name, rec in results["sections"].items():
        st = rec.get("status", "?")
        key = {"ok": "ok", "skipped": "skipped", "failed": "failed", "not_run": "not_run"}.get(st, "error")
        by.setdefault(key, []).append(name)
    return {k: by.get(k, []) for k in ("ok", "failed", "error", "skipped", "not_run")}


# ==================================================================================================== markdown
def _fmt(v, spec=".3g"):
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _section_line(name, rec) -> str:
    d = rec.get("data") or {}
    st = rec.get("status")
    if st in ("skipped", "not_run") or (st != "ok" and st != "failed"):
        why = rec.get("reason") or d.get("reason") or d.get("error") or ""
        return str(why).splitlines()[0][:160] if why else ""
    if name == "env":
        return d.get("device_name") or d.get("device", "")
    if name == "identity":
        return "; ".join(f"S={r['workers']}: identity {'exact' if r['identity_exact'] else 'DIFFERS'}, "
                         f"blank write-back {'exact' if r['blank_restore_exact'] else 'DIFFERS'}"
                         for r in d.get("rows", []))
    if name == "s1_equals_sgd":
        parts = []
        for r in d.get("rows", []):
            if r.get("error"):
                parts.append(f"{r['mode']}/{r['optimizer_state']}: {r['error'][:60]}")
            else:
                parts.append(f"{r['mode']}/{r['optimizer_state']}: max abs {r['max_abs_diff']:.2g}, rel "
                             f"{r['rel_norm_diff']:.2g}{' (bit-equal)' if r['bit_equal'] else ''} "
                             f"[SGD vs SGD: {r['sgd_rerun_max_abs_diff']:.2g}]")
        return "; ".join(parts)
    if name == "bf16_rounds":
        return (f"worker loss {_fmt(d.get('worker_loss_first_round'))} -> {_fmt(d.get('worker_loss_last_round'))}, "
                f"assembled eval loss {_fmt(d.get('eval_loss_before'))} -> {_fmt(d.get('eval_loss_after'))}, "
                f"finite {d.get('finite')}")
    if name == "fsdp_bf16":
        return (f"forward {d.get('forward_output_dtype')}, shards {d.get('shard_dtypes')}, slices loaded exactly "
                f"{d.get('slices_loaded_exactly')}, worker loss {_fmt(d.get('worker_loss_first_round'))} -> "
                f"{_fmt(d.get('worker_loss_last_round'))}, step s fsdp/plain {_fmt(d.get('step_s_fsdp_worker'))}/"
                f"{_fmt(d.get('step_s_plain_worker'))}, peak MiB fsdp/plain {_fmt(d.get('peak_mib_fsdp_worker'))}/"
                f"{_fmt(d.get('peak_mib_plain_worker'))}")
    if name.startswith("ds_"):
        if not d.get("rounds"):
            return d.get("error", "")
        rs = d["rounds"]
        return (f"module = slices {all(r['module_equals_slices'] for r in rs)}, master = slices "
                f"{all(r['master_equals_slices'] for r in rs)} (master copy: {d.get('master_copy')}; stale "
                f"before push in {sum(bool(r.get('master_stale_before_push')) for r in rs)}/{len(rs)} rounds), "
                f"next step vs plain: max rel {max(r['next_step_rel_diff'] for r in rs):.2g} "
                f"(tol {d.get('tolerance')})")
    if name.startswith("throughput_"):
        parts = [f"b{r['batch']} {r['variant']}: {r['throughput_vs_dense']:.2f}x img/s"
                 + (f", {r['peak_vs_dense']:.2f}x peak" if r.get("peak_vs_dense") else "")
                 for r in d.get("rows", []) if r["variant"] != "dense" and r.get("throughput_vs_dense")]
        return "; ".join(parts) + (f" ({len(d['skipped_rows'])} rows cut by the time budget)"
                                   if d.get("skipped_rows") else "")
    return ""


def render_markdown(results) -> str:
    secs = results["sections"]
    env = (secs.get("env") or {}).get("data") or {}
    lines = [f"# GPU check ({results['mode']})", ""]
    if env:
        mem = env.get("total_memory_gib")
        lines.append(
            f"{env.get('device_name') or env.get('device')}"
            + (f" (capability {env.get('capability')}, {mem:.1f} GiB, driver {env.get('driver_version')}, "
               f"CUDA {env.get('cuda_version')}, cuDNN {env.get('cudnn_version')})" if mem else "")
            + f"; torch {env.get('versions', {}).get('torch')}, timm {env.get('versions', {}).get('timm')}, "
              f"deepspeed {env.get('versions', {}).get('deepspeed')}; {results.get('wall_s')} s in all")
        lines.append("")
    lines += ["| section | status | s | result |", "|---|---|---|---|"]
    for name in ITEMS:
        if name in secs:
            rec = secs[name]
            lines.append(f"| {name} | {rec.get('status')} | {_fmt(rec.get('seconds'), '.1f')} | "
                         f"{_section_line(name, rec).replace('|', '/')} |")
    rows = []
    for name in ITEMS:
        if name.startswith("throughput_") and name in secs:
            rows += (secs[name].get("data") or {}).get("rows", [])
    if rows:
        d0 = next((secs[n].get("data") or {}) for n in ITEMS if n.startswith("throughput_") and n in secs)
        lines += ["", f"Training step of one worker ({d0.get('precision')}, {d0.get('memory_format')}, SGD momentum "
                      f"0.9; img/s = batch x timed steps / their time, CUDA events on a GPU; peak = max_memory_allocated):", "",
                  "| model | px | batch | variant | params (M) | img/s per worker | step ms (median) | peak MiB | "
                  "img/s vs dense | peak vs dense |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r.get('image_size', 32)} | {r['batch']} | {r['variant']} | "
                         f"{r['params'] / 1e6:.2f} | "
                         f"{_fmt(r.get('images_per_s'), '.0f')} | {_fmt(r.get('step_ms_median'), '.2f')} | "
                         f"{_fmt(r.get('peak_mib'), '.0f')} | {_fmt(r.get('throughput_vs_dense'), '.3f')} | "
                         f"{_fmt(r.get('peak_vs_dense'), '.3f')} |")
    s = results.get("summary")
    if s:
        lines += ["", f"ok {len(s['ok'])}, failed {len(s['failed'])} {s['failed'] or ''}, error "
                      f"{len(s['error'])} {s['error'] or ''}, skipped {len(s['skipped'])}, not run {len(s['not_run'])}"]
    return "\n".join(lines) + "\n"


# ==================================================================================================== child
class Skip(Exception):
    """A section (or part of one) that cannot run here; the message is the recorded reason."""


class Ctx:
    """What the sections share inside one child: device, sizes, the process group, progress files."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.cpu = args.cpu_smoke
        if not self.cpu and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke on a machine without a GPU")
        self.device = torch.device("cpu") if self.cpu else torch.device("cuda", 0)
        if not self.cpu:
            torch.cuda.set_device(0)
        self.dev_type = self.device.type
        self.global_deadline = args.deadline
        self.item = None
        self.partial: dict = {}
        self.t0 = time.time()
        self.dist = None  # (grid, backend) once the process group is up

    def path(self, item):
        return os.path.join(self.args.workdir, f"{item}.json")

    def progress(self, data: dict) -> None:
        """Keep a section's partial results on disk (a crash or timeout still reports them)."""
        self.partial = data
        _write_json(self.path(self.item), {"status": "running", "started": self.t0, "data": data})

    def sync(self):
        if self.dev_type == "cuda":
            self.torch.cuda.synchronize()

    def free(self):
        """Release the previous row's CUDA memory (a no-op on the CPU, where gc.collect costs ~0.4 s)."""
        if self.dev_type == "cuda":
            import gc

            gc.collect()
            self.torch.cuda.empty_cache()


def _synthetic(torch, device, n_batches, batch, seed, noise=1.0, channels_last=False, size=32):
    """Fixed CIFAR-shaped batches (size x size) made on the device: a random prototype per class plus noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    protos = torch.randn(10, 3, size, size, generator=g, device=device)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 10, (batch,), generator=g, device=device)
        x = protos[y] + noise * torch.randn(batch, 3, size, size, generator=g, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, y))
    return out


def _fp32_exact(torch, on: bool):
    """TF32 off (fp32 comparisons) or back to torch's defaults (matmul off, cuDNN convolutions on)."""
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = not on
    except RuntimeError:  # torch refuses the legacy flags once something used the fp32_precision API
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee" if on else "tf32"


# ---------------------------------------------------------------------------------------------- sections
def sec_env(ctx: Ctx) -> dict:
    import importlib.metadata as md

    torch = ctx.torch
    versions = {}
    for pkg in ("torch", "timm", "deepspeed", "numpy", "accelerate", "pydantic"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    d = {"device": str(ctx.device), "versions": versions, "torch_cuda": torch.version.cuda,
         "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0],
         "threads": torch.get_num_threads()}
    if ctx.dev_type != "cuda":
        d["reason"] = "cpu-smoke: no CUDA device, card fields not recorded"
        return d
    props = torch.cuda.get_device_properties(0)
    d.update(device_name=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
             total_memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
             device_count=torch.cuda.device_count(), cuda_version=torch.version.cuda,
             cudnn_version=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
             nccl_version=_nccl_version(torch))
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        d["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        d["driver_version"] = q.stdout.split(",")[1].strip() if q.returncode == 0 and "," in q.stdout else None
    except (OSError, subprocess.SubprocessError) as exc:
        d["nvidia_smi"] = f"unavailable ({exc})"
        d["driver_version"] = None
    return d


def _nccl_version(torch):
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
    except Exception as exc:  # informational only
        return f"unavailable ({type(exc).__name__})"


def sec_identity(ctx: Ctx) -> dict:
    """tests/test_subnet.py::test_slice_then_write_back_is_the_identity for resnet18 on the device."""
    import copy

    from loft_ext.models import create_model
    from loft_ext.partition.plan import make_plan
    from loft_ext.partition.subnet import Slicer, build_subnet, covered_mask, draw_partition, tensors_of

    torch = ctx.torch
    torch.manual_seed(0)
    base = create_model("resnet18", num_classes=10)
    rows = []
    for workers in (2, 4):
        plan = make_plan(base, workers, "all", (1, 3, 32, 32), "resnet18")
        full = copy.deepcopy(base).to(ctx.device)
        original = {k: v.clone() for k, v in tensors_of(full).items()}
        part = draw_partition(plan, seed=3, round_index=11)
        subs = [build_subnet(full, plan, s) for s in range(workers)]
        slicers = [Slicer(plan, full, subs[s], s) for s in range(workers)]
        for sl in slicers:
            sl.load(part)
        for sl in slicers:  # 1) write back into the same model: nothing changes, bit for bit
            sl.write_back(part)
        differ = [k for k, v in tensors_of(full).items() if not torch.equal(v, original[k])]
        with torch.no_grad():  # 2) write back into a blank model: exactly the held entries come back
            for k in plan.tensor_dims:
                tensors_of(full)[k].fill_(float("nan"))
        for sl in slicers:
            sl.write_back(part)
        blank_bad = []
        for k in plan.tensor_dims:
            v = tensors_of(full)[k]
            covered = covered_mask(plan, part, k, tuple(v.shape)).to(v.device)
            ok = torch.equal(~torch.isnan(v), covered) and torch.equal(v[covered], original[k][covered])
            if len(plan.tensor_dims[k]) == 1:
                ok = ok and bool(covered.all())
            if not ok:
                blank_bad.append(k)
        x = torch.randn(2, 3, 32, 32, device=ctx.device)
        shapes, on_device = [], True
        for sub in subs:
            sub.eval()
            with torch.no_grad():
                shapes.append(list(sub(x).shape))
            on_device &= all(t.device.type == ctx.dev_type for t in tensors_of(sub).values())
        rows.append({"workers": workers, "split_tensors": len(plan.tensor_dims), "identity_exact": not differ,
                     "identity_differs": differ[:10], "blank_restore_exact": not blank_bad,
                     "blank_restore_bad": blank_bad[:10], "sub_output_shapes": shapes, "subs_on_device": on_device,
                     "sub_params": [sum(p.numel() for p in s.parameters()) for s in subs],
                     "full_params": sum(p.numel() for p in full.parameters())})
        ctx.progress({"rows": rows})
        del full, subs, slicers, original
        ctx.free()
    passed = all(r["identity_exact"] and r["blank_restore_exact"] and r["subs_on_device"]
                 and all(s == [2, 10] for s in r["sub_output_shapes"]) for r in rows)
    return {"rows": rows, "passed": passed, "device": str(ctx.device)}


def sec_s1_equals_sgd(ctx: Ctx) -> dict:
    """tests/test_engine.py::test_single_worker_loft_equals_plain_training on the device, fp32."""
    import copy
    import warnings

    import torch.nn.functional as F

    from loft_ext.engine.loft import LoFTEngine

    from loft_ext.engine.loop import local_step
    from loft_ext.models import create_model
    from loft_ext.partition.plan import make_plan
    from loft_ext.partition.subnet import tensors_of

    torch = ctx.torch
    tol = 1e-5
    rounds, local_steps, batch = (2, 1, 4) if ctx.cpu else (3, 4, 64)
    torch.manual_seed(0)
    base = create_model("resnet18", num_classes=10)
    plan = make_plan(base, 1, "all", (1, 3, 32, 32), "resnet18")
    data = _synthetic(torch, ctx.device, rounds * local_steps, batch, seed=1)

    def sgd(momentum):
        return lambda params: torch.optim.SGD(params, lr=0.05, momentum=momentum, weight_decay=5e-4)

    def sgd_run(momentum):
        plain = copy.deepcopy(base).to(ctx.device)
        opt = sgd(momentum)(plain.parameters())
        plain.train()
        for x, y in data:
            loss = F.cross_entropy(plain(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return plain

    def compare(a_model, b_model):
        # relative to the model's norm: a per-tensor ratio blows up on tensors near zero (BN biases after a
        # few steps of momentum-free SGD are ~1e-4, so a 3e-6 rounding difference read as 1.5%)
        diff_sq = ref_sq = max_abs = 0.0
        n_differ, worst, worst_abs = 0, None, 0.0
        for (k, a), (_, b) in zip(tensors_of(a_model).items(), tensors_of(b_model).items()):
            if not a.is_floating_point():
                n_differ += int(not torch.equal(a, b))
                continue
            d = (a.double() - b.double())
            diff_sq += float(d.pow(2).sum())
            ref_sq += float(a.double().pow(2).sum())
            if not torch.equal(a, b):
                n_differ += 1
                m = float(d.abs().max())
                if m > worst_abs:
                    worst, worst_abs = k, m
                max_abs = max(max_abs, m)
        return {"max_abs_diff": max_abs, "rel_norm_diff": (diff_sq ** 0.5) / max(ref_sq ** 0.5, 1e-30),
                "tensors_differ": n_differ, "worst_tensor": worst, "bit_equal": n_differ == 0}

    def one(momentum, optimizer_state, mode):
        plain = sgd_run(momentum)
        full = copy.deepcopy(base).to(ctx.device)
        engine = LoFTEngine(full, plan, make_optimizer=sgd(momentum), seed=1, optimizer_state=optimizer_state)
        it = iter(data)
        for r in range(rounds):
            engine.begin_round(r)
            for _ in range(local_steps):
                local_step(engine.workers[0], *next(it))
            engine.sync()
        row = compare(plain, full)
        # the noise floor: plain SGD against itself (cuDNN's default algorithms need not be deterministic)
        rerun = compare(plain, sgd_run(momentum))
        row.update(tensors=len(tensors_of(plain)), sgd_rerun_max_abs_diff=rerun["max_abs_diff"],
                   sgd_rerun_rel_norm_diff=rerun["rel_norm_diff"])
        # deterministic algorithms: the same kernels in the same order, so LoFT with S=1 is SGD bit for bit
        row["passed"] = row["bit_equal"] if mode == "deterministic" else row["rel_norm_diff"] <= tol
        return row

    rows = []
    torch.backends.cudnn.benchmark = False
    _fp32_exact(torch, True)
    try:
        for mode in ("default", "deterministic"):
            for momentum, state in ((0.0, "reset"), (0.9, "carry")):
                row = {"mode": mode, "momentum": momentum, "optimizer_state": state}
                caught = []
                try:
                    if mode == "deterministic":
                        torch.backends.cudnn.deterministic = True
                        torch.use_deterministic_algorithms(True, warn_only=True)
                    with warnings.catch_warnings(record=True) as w:
                        warnings.simplefilter("always")
                        row.update(one(momentum, state, mode))
                        caught = sorted({str(x.message).splitlines()[0][:200] for x in w})
                except Exception as exc:  # e.g. an op without a deterministic kernel
                    row.update(error=f"{type(exc).__name__}: {exc}"[:500], passed=mode == "deterministic")
                finally:
                    torch.use_deterministic_algorithms(False)
                    torch.backends.cudnn.deterministic = False
                row["warnings"] = caught
                rows.append(row)
                ctx.progress({"rows": rows})
                ctx.free()
    finally:
        _fp32_exact(torch, False)
    return {"rows": rows, "tolerance_rel_norm": tol, "rounds": rounds, "local_steps": local_steps, "batch": batch,
            "tf32": False, "passed": all(r["passed"] for r in rows)}


def sec_bf16_rounds(ctx: Ctx) -> dict:
    import statistics

    import torch.nn.functional as F

    from loft_ext.engine.loft import LoFTEngine

    from loft_ext.engine.loop import local_step
    from loft_ext.models import create_model
    from loft_ext.partition.plan import make_plan
    from loft_ext.partition.subnet import tensors_of

    torch = ctx.torch
    workers = 2
    rounds, local_steps, batch, n_batches = (3, 2, 16, 4) if ctx.cpu else (6, 4, 128, 8)
    torch.manual_seed(0)
    full = create_model("resnet18", num_classes=10)
    plan = make_plan(full, workers, "all", (1, 3, 32, 32), "resnet18")
    full.to(ctx.device, memory_format=torch.channels_last)  # the recipe's --mixed_precision bf16 --channels_last
    data = _synthetic(torch, ctx.device, n_batches, batch, seed=2, channels_last=True)

    def autocast():
        return torch.autocast(ctx.dev_type, dtype=torch.bfloat16)

    @torch.no_grad()
    def eval_loss(model):
        model.eval()
        with autocast():
            return statistics.fmean(F.cross_entropy(model(x), y).item() for x, y in data)

    before = eval_loss(full)
    engine = LoFTEngine(full, plan, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
                        seed=0, optimizer_state="reset")
    layout_kept = all(t.is_contiguous(memory_format=torch.channels_last)
                      for w in engine.workers for t in tensors_of(w.model).values() if t.dim() == 4)
    per_round, finite = [], True
    for r in range(rounds):
        engine.begin_round(r)
        losses = []
        for w in engine.workers:
            for step in range(local_steps):
                x, y = data[(r * local_steps * workers + step * workers + w.index) % n_batches]
                losses.append(local_step(w, x, y, autocast=autocast, memory_format=torch.channels_last))
        engine.sync()
        finite_r = all(bool(torch.isfinite(t).all()) for t in tensors_of(full).values() if t.is_floating_point())
        finite &= finite_r and all(map(lambda v: v == v and abs(v) != float("inf"), losses))
        per_round.append({"round": r, "worker_losses": losses, "finite": finite_r})
        ctx.progress({"rounds": per_round})
    after = eval_loss(full)
    first = statistics.fmean(per_round[0]["worker_losses"])
    last = statistics.fmean(per_round[-1]["worker_losses"])
    dtypes = sorted({str(p.dtype) for p in full.parameters()})
    return {"rounds": per_round, "workers": workers, "local_steps": local_steps, "batch": batch,
            "batches_in_set": n_batches, "worker_loss_first_round": first, "worker_loss_last_round": last,
            "eval_loss_before": before, "eval_loss_after": after, "finite": finite, "param_dtypes": dtypes,
            "channels_last_kept": layout_kept, "passed": bool(finite and layout_kept and last < first and after < before)}


def sec_fsdp_bf16(ctx: Ctx) -> dict:
    """LoFT rounds (resnet18, S=2, simulated) with worker 0 trained as the FSDP2-sharded copy of
    ``--replicas fsdp --mixed_precision bf16`` (loft_ext.parallel.sharded: bf16 compute and all-gathers, fp32
    shards and gradient reduce-scatter) on a one-rank mesh over the run's process group (NCCL on the GPU;
    one GPU gives D = 1: the D > 1 collectives are tested on gloo by tests/test_fsdp.py), worker 1 plain torch
    under bf16 autocast, as the recipe runs it. Checks: the forward computes in bf16 while the shards and
    their gradients stay fp32; the round's slices reach the shards at every round start and the trained
    values come back at the sync (the assembled model moves); everything stays finite and the loss falls.
    Measures each worker's training-step time and the CUDA peak memory of a step of each."""
    import statistics

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from loft_ext.engine.loft import LoFTEngine
    from loft_ext.engine.loop import local_step
    from loft_ext.models import create_model
    from loft_ext.parallel.sharded import ShardedReplica
    from loft_ext.partition.plan import make_plan
    from loft_ext.partition.subnet import read_slice

    torch = ctx.torch
    _ds_setup(ctx)
    mesh = init_device_mesh(ctx.dev_type, (1,), mesh_dim_names=("shard",))
    rounds, local_steps, batch, n_batches = (3, 2, 16, 4) if ctx.cpu else (6, 4, 128, 8)
    torch.manual_seed(0)
    full = create_model("resnet18", num_classes=10).to(ctx.device)
    plan = make_plan(full, 2, "all", (1, 3, 32, 32), "resnet18")
    data = _synthetic(torch, ctx.device, n_batches, batch, seed=3)
    engine = LoFTEngine(full, plan, seed=0, optimizer_state="reset")
    w0, w1 = engine.workers
    w0.sharded = sharded = ShardedReplica(w0.model, mesh, "bf16")
    w0.module, w0.after_load, w0.before_sync = sharded.module, sharded.load, sharded.gather
    engine.attach_optimizers([torch.optim.SGD(w.module.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
                              for w in engine.workers])
    seen = {}
    def record_dtype(module, inputs, output):  # returns None: the output is left as it is
        seen.setdefault("output_dtype", str(output.dtype))
    sharded.module.register_forward_hook(record_dtype)

    def autocast():
        return torch.autocast(ctx.dev_type, dtype=torch.bfloat16)

    def timed_step(w, x, y):
        ctx.sync()
        if not ctx.cpu:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss = local_step(w, x, y, autocast=autocast)
        ctx.sync()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if not ctx.cpu else None
        return loss, time.perf_counter() - t, peak

    per_round, times, peaks, finite, loads_exact = [], {0: [], 1: []}, {0: [], 1: []}, True, True
    for r in range(rounds):
        part = engine.begin_round(r)
        for name, p in sharded.module.named_parameters():  # the round's slices reached the shards
            want = read_slice(dict(full.named_parameters())[name], w0.slicer.indices(part, name)) \
                if name in plan.tensor_dims else dict(full.named_parameters())[name]
            local = p.to_local() if isinstance(p, DTensor) else p
            loads_exact &= bool(torch.equal(local, want.detach()))
        before = {k: v.detach().clone() for k, v in full.state_dict().items()}
        losses = []
        for step in range(local_steps):
            for w in engine.workers:
                x, y = data[(r * local_steps * 2 + step * 2 + w.index) % n_batches]
                loss, dt, peak = timed_step(w, x, y)
                losses.append(loss)
                if r > 0:  # the first round pays one-time allocations
                    times[w.index].append(dt)
                    peaks[w.index].append(peak)
        grads = {str(p.grad.dtype) for p in sharded.module.parameters() if p.grad is not None}
        engine.sync()
        moved = max((full.state_dict()[k].float() - v.float()).abs().max().item() for k, v in before.items()
                    if v.is_floating_point())
        finite_r = all(bool(torch.isfinite(t).all()) for t in full.state_dict().values() if t.is_floating_point())
        finite &= finite_r and all(v == v and abs(v) != float("inf") for v in losses)
        per_round.append({"round": r, "worker_losses": losses, "finite": finite_r, "assembled_moved": moved,
                          "grad_dtypes": sorted(grads)})
        ctx.progress({"rounds": per_round})
    shard_dtypes = sorted({str(p.dtype) for p in sharded.module.parameters()})
    first = statistics.fmean(per_round[0]["worker_losses"])
    last = statistics.fmean(per_round[-1]["worker_losses"])
    step_s = {k: statistics.median(v) for k, v in times.items() if v}
    dtypes_ok = (seen.get("output_dtype") == "torch.bfloat16" and shard_dtypes == ["torch.float32"]
                 and all(r["grad_dtypes"] == ["torch.float32"] for r in per_round))
    return {"rounds": per_round, "batch": batch, "local_steps": local_steps,
            "forward_output_dtype": seen.get("output_dtype"),
            "shard_dtypes": shard_dtypes, "slices_loaded_exactly": loads_exact, "finite": finite,
            "worker_loss_first_round": first, "worker_loss_last_round": last,
            "step_s_fsdp_worker": step_s.get(0), "step_s_plain_worker": step_s.get(1),
            "peak_mib_fsdp_worker": max(peaks[0]) if peaks[0] and peaks[0][0] is not None else None,
            "peak_mib_plain_worker": max(peaks[1]) if peaks[1] and peaks[1][0] is not None else None,
            "passed": bool(dtypes_ok and loads_exact and finite and last < first
                           and all(r["assembled_moved"] > 0 for r in per_round))}


def _ds_setup(ctx: Ctx):
    """World size 1 process group (NCCL on a GPU, gloo in --cpu-smoke) and the 1-worker grid."""
    if ctx.dist is not None:
        return ctx.dist
    import socket

    import torch.distributed as dist

    from loft_ext.parallel.grid import build_grid

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    backend = "gloo" if ctx.cpu else "nccl"
    t0 = time.time()
    dist.init_process_group(backend)
    grid = build_grid(1)
    ctx.dist = (grid, backend, round(time.time() - t0, 2))
    return ctx.dist


def sec_deepspeed(ctx: Ctx, config: str) -> dict:
    """The slice-load check of tests/test_deepspeed.py (the runner's debug-hash check) on one process."""
    from loft_ext.engine.loft import LoFTEngine
    from loft_ext.engine.loop import local_step
    from loft_ext.models import create_model
    from loft_ext.parallel import ds
    from loft_ext.partition.plan import make_plan
    from loft_ext.partition.subnet import Slicer, build_subnet, read_slice

    torch = ctx.torch
    path = os.path.join(ROOT, "ds_configs", config)
    with open(path) as f:
        raw = json.load(f)
    bf16 = bool(raw.get("torch_autocast", {}).get("enabled") or raw.get("bf16", {}).get("enabled"))
    if ctx.cpu and config.endswith("_gpu.json") and not ctx.args.force_gpu_configs:
        raise Skip(f"cpu-smoke: ds_configs/{config} is the GPU config (NCCL, bf16 torch_autocast on CUDA); "
                   "it runs in the GPU check")
    notes = []
    try:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param
    except Exception as exc:
        raise RuntimeError(f"deepspeed not importable ({type(exc).__name__}: {exc}); on a device machine carry "
                           "the wheels made by benchmarks/gpu_check_wheels.sh (.whl)") from None
    if ctx.cpu:
        # the CPU accelerator JIT-builds a shared-memory all-reduce op (~90 s) in its comm backend; world size 1
        # never uses it
        import importlib

        # (not `import deepspeed.comm.torch as m`: deepspeed.comm's attribute `torch` is the torch package)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        notes.append("cpu-smoke: DeepSpeed's shm comm op build skipped (world size 1)")
    grid, backend, init_s = _ds_setup(ctx)
    micro = raw["train_micro_batch_size_per_gpu"]
    cfg = ds.load_ds_config(path, micro, 1)
    batch = 8 if ctx.cpu else micro
    rounds, local_steps = (2, 2) if ctx.cpu else (3, 2)
    lr, momentum, wd = 0.05, 0.9, 5e-4
    clip = float(cfg.get("gradient_clipping", 0.0))
    tol = 5e-2 if bf16 else (1e-6 if ctx.cpu else 1e-4)
    torch.backends.cudnn.benchmark = False
    if not bf16:
        _fp32_exact(torch, True)

    torch.manual_seed(0)
    full = create_model("resnet18", num_classes=10)
    plan = make_plan(full, 2, "all", (1, 3, 32, 32), "resnet18")
    full.to(ctx.device)  # before the engine: sub-networks are built on the device, as in the runner

    def make_opt(ps):
        return torch.optim.SGD(ps, lr=lr, momentum=momentum, weight_decay=wd)

    engine = LoFTEngine(full, plan, make_optimizer=make_opt, seed=0, optimizer_state="reset")

    def autocast():
        return torch.autocast(ctx.dev_type, dtype=torch.bfloat16) if bf16 else _null()

    w0 = engine.workers[0]
    t0 = time.time()
    zero3 = ds.ZeroThreeReplica(w0.model) if ds.zero_stage(cfg) == 3 else None
    if zero3 is not None:  # as the runner: the engine partitions a copy; push after load, pull before sync
        w0.optimizer = make_opt(zero3.module.parameters())
        w0.ds_engine, _, clip0 = ds.initialize(zero3.module, w0.optimizer, cfg, ds.LoftMPU(grid), "joint")
        zero3.engine = w0.ds_engine
        w0.before_sync = zero3.pull
    else:
        w0.ds_engine, _, clip0 = ds.initialize(w0.model, w0.optimizer, cfg, ds.LoftMPU(grid), "joint")
    init_engine_s = round(time.time() - t0, 2)
    master_copy = ds.master_copy(w0.ds_engine)
    state = {}

    def master_matches():
        """The runner's DebugHashes check: DeepSpeed's fp32 copy (if any) of the engine's parameters equals
        the plain sub-network."""
        ok, has_master = True, False
        trained = dict(w0.ds_engine.module.named_parameters())
        for name, p in w0.model.named_parameters():
            m = safe_get_full_fp32_param(trained[name])
            if m is not None:
                has_master = True
                ok &= torch.equal(m.to(p.dtype).view_as(p), p.detach())
        return ok, has_master

    def after_load(e=w0.ds_engine):
        ok, _ = master_matches()
        state["stale_before_push"] = not ok  # control: without the push the master copy disagrees
        if zero3 is not None:
            zero3.push()
        else:
            ds.push_values(e)

    w0.after_load = after_load
    data = _synthetic(torch, ctx.device, rounds * local_steps * 2, batch, seed=3)
    it = iter(data)
    rows = []
    for r in range(rounds):
        part = engine.begin_round(r)
        module_ok = all(torch.equal(p.detach(), read_slice(w0.slicer.full_tensors[n], w0.slicer.indices(part, n)))
                        for n, p in w0.model.named_parameters())
        master_ok, has_master = master_matches()
        loaded = {n: p.detach().clone() for n, p in w0.model.named_parameters()}
        # the plain-torch step from the same values (fresh optimizer state: the round's `reset`)
        ref = build_subnet(full, plan, 0)
        Slicer(plan, full, ref, 0).load(part)
        ref_opt = make_opt(ref.parameters())
        x, y = next(it)
        ref.train()
        with autocast():
            loss_ref = torch.nn.functional.cross_entropy(ref(x), y)
        ref_opt.zero_grad(set_to_none=True)
        loss_ref.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
        loss_ds = local_step(w0, x, y, autocast=autocast, clip_norm=clip0)
        if zero3 is not None:  # the trained values into the plain sub-network (the sync does it too)
            zero3.pull()
        num = den = 0.0
        max_abs = 0.0
        ref_params = dict(ref.named_parameters())
        for n, p in w0.model.named_parameters():
            d_ds = p.detach().double() - loaded[n].double()
            d_ref = ref_params[n].detach().double() - loaded[n].double()
            num += (d_ds - d_ref).pow(2).sum().item()
            den += d_ref.pow(2).sum().item()
            max_abs = max(max_abs, (p.detach().double() - ref_params[n].detach().double()).abs().max().item())
        rel = (num ** 0.5) / max(den ** 0.5, 1e-30)
        moved = den > 0
        master_after_ok, _ = master_matches()
        for _ in range(local_steps - 1):
            local_step(w0, *next(it), autocast=autocast, clip_norm=clip0)
        for w in engine.workers[1:]:
            for _ in range(local_steps):
                local_step(w, *data[(r * 7 + 1) % len(data)], autocast=autocast)
        engine.sync()
        rows.append({"round": r, "module_equals_slices": module_ok, "master_equals_slices": master_ok,
                     "has_master": has_master, "master_stale_before_push": state.get("stale_before_push"),
                     "next_step_rel_diff": rel, "next_step_max_abs_diff": max_abs, "reference_moved": moved,
                     "master_equals_module_after_step": master_after_ok, "loss_ds": loss_ds,
                     "loss_ref": float(loss_ref.item())})
        ctx.progress({"rounds": rows})
        del ref, ref_opt
    finite = all(bool(torch.isfinite(t).all()) for t in w0.slicer.full_tensors.values() if t.is_floating_point())
    passed = finite and all(r["module_equals_slices"] and r["master_equals_slices"] and r["reference_moved"]
                            and r["next_step_rel_diff"] <= tol and r["master_equals_module_after_step"]
                            for r in rows)
    if master_copy and not all(r["has_master"] for r in rows):
        passed = False
        notes.append("DeepSpeed reports a master copy but safe_get_full_fp32_param returned None")
    info = {"config": f"ds_configs/{config}", "backend": backend, "process_group_init_s": init_s,
            "engine_init_s": init_engine_s, "mpu": "LoftMPU(build_grid(1)): model-parallel world 1, data-parallel world 1",
            "wrapped": "worker 0 of an S=2 plan (resnet18, preset all) in a LoFTEngine; worker 1 plain torch",
            "zero_stage": w0.ds_engine.zero_optimization_stage(), "master_copy": master_copy,
            "bf16": bf16, "gradient_clipping": clip, "batch": batch, "rounds": rows, "tolerance": tol,
            "finite": finite, "deepspeed_version": deepspeed.__version__, "notes": notes, "passed": passed}
    if hasattr(w0.ds_engine, "destroy"):
        try:
            w0.ds_engine.destroy()
        except Exception as exc:  # cleanup only
            notes.append(f"engine.destroy(): {exc}")
    _fp32_exact(torch, False)
    return info


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def sec_throughput(ctx: Ctx, model_name: str, budget: float) -> dict:
    import statistics

    import torch.nn.functional as F

    from loft_ext.models import create_model
    from loft_ext.partition.plan import make_plan
    from loft_ext.partition.subnet import Slicer, build_subnet, draw_partition

    torch = ctx.torch
    t_start = time.time()
    soft_end = min(t_start + 0.8 * budget, ctx.global_deadline - 5)
    if ctx.cpu:
        batches, warmup, steps, precision = [4], 1, 1, "fp32 (cpu-smoke: no autocast)"
    else:
        batches = [int(b) for b in (ctx.args.batches or "256,2048").split(",")]
        warmup, steps, precision = 10, 30, "bf16 autocast"
    cuda = ctx.dev_type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    plans = {}
    probe = create_model(model_name, num_classes=10)
    for s in (2, 4):
        plans[s] = make_plan(probe, s, "all", (1, 3, 32, 32), model_name)
    full_params = sum(p.numel() for p in probe.parameters())
    del probe
    rows, notes = [], []
    if not cuda:
        notes.append("cpu-smoke: peak memory not measured (torch.cuda.max_memory_allocated needs CUDA)")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else _null()

    for batch in batches:
        for variant, s in (("dense", 1), ("S=2", 2), ("S=4", 4)):
            if time.time() > soft_end:
                rows.append({"model": model_name, "batch": batch, "variant": variant, "params": 0,
                             "skipped": "time budget"})
                continue
            ctx.free()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(0)
            full = create_model(model_name, num_classes=10)  # each row's model built fresh
            if s == 1:
                model = full
            else:  # worker 0's sub-network holding its round-0 slices
                model = build_subnet(full, plans[s], 0)
                Slicer(plans[s], full, model, 0).load(draw_partition(plans[s], 0, 0))
            del full
            model = model.to(ctx.device, memory_format=torch.channels_last).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            size = ctx.args.image_size
            data = _synthetic(torch, ctx.device, 4, batch, seed=4, channels_last=True, size=size)

            last = {}

            def step(i):
                x, y = data[i % len(data)]
                with autocast():
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last["loss"] = loss.detach()

            row = {"model": model_name, "batch": batch, "variant": variant, "workers": s, "image_size": size,
                   "params": sum(p.numel() for p in model.parameters()),
                   "data_mib": len(data) * batch * 3 * size * size * 4 / 2**20}  # the batch pool, inside the peak
            row["param_fraction"] = row["params"] / full_params
            t0 = time.time()
            for i in range(warmup):
                step(i)
            ctx.sync()
            row["warmup_s"] = round(time.time() - t0, 3)
            row_end = min(soft_end, time.time() + 0.25 * budget)
            times = []
            if cuda:
                events = []
                for i in range(steps):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    step(i)
                    b.record()
                    events.append((a, b))
                    if i % 5 == 4:
                        b.synchronize()
                        if time.time() > row_end:
                            break
                torch.cuda.synchronize()
                times = [a.elapsed_time(b) / 1e3 for a, b in events]
                span = events[0][0].elapsed_time(events[-1][1]) / 1e3  # first start to last end, gaps included
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            else:
                for i in range(steps):
                    t1 = time.perf_counter()
                    step(i)
                    times.append(time.perf_counter() - t1)
                span = sum(times)
                row["peak_mib"] = None
            row.update(timed_steps=len(times), step_ms_median=1e3 * statistics.median(times),
                       step_ms_min=1e3 * min(times), images_per_s=batch * len(times) / span, timed_s=span,
                       last_loss=float(last["loss"]))
            rows.append(row)
            ctx.progress({"rows": rows})
            del model, opt, data
    for r in rows:
        dense = next((d for d in rows if d["batch"] == r["batch"] and d["variant"] == "dense"
                      and d.get("images_per_s")), None)
        if dense and r.get("images_per_s"):
            r["throughput_vs_dense"] = r["images_per_s"] / dense["images_per_s"]
            if r.get("peak_mib") and dense.get("peak_mib"):
                r["peak_vs_dense"] = r["peak_mib"] / dense["peak_mib"]
    ctx.free()
    return {"rows": [r for r in rows if not r.get("skipped")], "skipped_rows": [r for r in rows if r.get("skipped")],
            "precision": precision, "memory_format": "channels_last", "warmup": warmup, "steps": steps,
            "cudnn_benchmark": True, "optimizer": "SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)",
            "preset": "all", "sub_network": "worker 0 of make_plan(model, S, 'all', (1, 3, 32, 32))",
            "notes": notes, "passed": any(not r.get("skipped") for r in rows)}


def run_child(args) -> int:
    sys.path.insert(0, ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu_smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ctx = Ctx(args)
    current = {"item": None, "hard_end": None}

    def watchdog():
        while True:
            time.sleep(0.5)
            item, end = current["item"], current["hard_end"]
            if item and end and time.time() > end:
                _write_json(ctx.path(item), {"status": "timeout", "seconds": round(time.time() - current["t0"], 1),
                                             "reason": "section's own time limit; partial data kept",
                                             "data": ctx.partial})
                sys.stdout.flush()
                os._exit(124)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        for item in args.items.split(","):
            limit = ITEMS[item][2 if args.cpu_smoke else 1]
            ctx.item, ctx.partial = item, {}
            t0 = ctx.t0 = time.time()
            _write_json(ctx.path(item), {"status": "running", "started": t0, "data": {}})
            current.update(item=item, t0=t0, hard_end=min(t0 + limit, args.deadline))
            print(f"===== {item} (limit {limit} s)", flush=True)
            if args.simulate.startswith(f"{item}:"):  # recovery check: die or hang inside this section
                if args.simulate.endswith(":crash"):
                    os._exit(3)
                while True:
                    time.sleep(1)
            try:
                if item == "env":
                    data = sec_env(ctx)
                elif item == "identity":
                    data = sec_identity(ctx)
                elif item == "s1_equals_sgd":
                    data = sec_s1_equals_sgd(ctx)
                elif item == "bf16_rounds":
                    data = sec_bf16_rounds(ctx)
                elif item == "fsdp_bf16":
                    data = sec_fsdp_bf16(ctx)
                elif item in DS_CONFIGS:
                    data = sec_deepspeed(ctx, DS_CONFIGS[item])
                elif item.startswith("throughput_"):
                    data = sec_throughput(ctx, item[len("throughput_"):], limit)
                else:
                    raise ValueError(item)
                rec = {"status": "ok" if data.get("passed", True) else "failed", "data": data}
            except Skip as exc:
                rec = {"status": "skipped", "reason": str(exc), "data": {}}
            except Exception as exc:
                traceback.print_exc()
                rec = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:2000],
                       "traceback": traceback.format_exc()[-4000:], "data": ctx.partial}
            current.update(item=None, hard_end=None)
            rec["seconds"] = round(time.time() - t0, 1)
            _write_json(ctx.path(item), rec)
            print(f"===== {item}: {rec['status']} in {rec['seconds']} s", flush=True)
            try:
                ctx.free()
            except Exception:
                pass
    finally:
        if ctx.dist is not None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:
                traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (NCCL/gloo and DeepSpeed can abort at exit)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output directory (default $OUT, else benchmarks/results/gpu_check/)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU; CUDA-only parts are skipped "
                                                            "with the reason recorded")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds for the whole run (default 240 on a GPU, "
                                                              "150 with --cpu-smoke); later sections shrink or are "
                                                              "recorded as not run")
    ap.add_argument("--only", default="", help=f"comma-separated sections among {', '.join(ITEMS)}")
    ap.add_argument("--batches", default="", help="throughput batch sizes on the GPU (default 256,2048)")
    ap.add_argument("--image_size", type=int, default=32,
                    help="throughput input size in pixels (default 32, CIFAR; 224 shows the ImageNet-sized step)")
    ap.add_argument("--isolate", action="store_true", help="--cpu-smoke: one child per group as on a GPU")
    ap.add_argument("--simulate", default="", help=argparse.SUPPRESS)  # ITEM:crash|hang, to check the recovery
    ap.add_argument("--force-gpu-configs", action="store_true", help=argparse.SUPPRESS)  # run the bf16 ds config on CPU
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--items", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
