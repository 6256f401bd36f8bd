"""`make bench`: every benchmark, one table of ratios against the targets of issue 7.

Runs, each as its own subprocess (a fresh interpreter; OMP_NUM_THREADS=1) that writes its own JSON:

- benchmarks/communication.py: bytes per rank per epoch of DDP, local SGD, star, LoFT allgather / alltoall
  (measured on gloo processes next to the analytic count);
- benchmarks/step_time.py: one worker's training step time, sub-network / dense;
- benchmarks/memory.py: one worker's peak training memory, sub-network / dense (exact accounting and RSS);
- benchmarks/fsdp_memory.py: per-rank training memory and LoFT sync bytes, FSDP vs DDP replicas (S=2 x D=2
  gloo processes; exact accounting);
- benchmarks/sync_time.py: sync time vs compute time per round on 2 gloo processes, both strategies;
- benchmarks/ticket_speed.py: inference of compact tickets vs dense (batch-1 latency, batch-64 throughput;
  1 thread and all threads; eager and torch.export; hidden-only and hidden+stream tickets at r = 0.5, 0.8).

Then prints one table (benchmark, case, measure, value, target, status) and writes it to ``--output``
with ``.txt``, and every raw number (each benchmark's JSON and printed output), the machine, the
versions and the command to ``--output`` (JSON).

    make bench                                   # or: python benchmarks/bench.py
    python benchmarks/bench.py --smoke           # tiny sizes (resnet18, 1 round, few steps), < 90 s
    python benchmarks/bench.py --only memory sync_time

``--smoke`` runs tiny versions to check that everything runs and that measured bytes equal the
analytic count; its times and ratios are not measurements, so only size-independent targets are
judged. The smoke run uses ``--jobs 2`` (two benchmarks at a time) unless told otherwise; full runs use
one, since timings need the machine to themselves.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 2.0 ** 20

# per benchmark: the options of the full run and of the smoke run
BENCHMARKS = {
    "communication": {"full": [], "smoke": ["--models", "resnet18", "--ranks", "2", "--local_steps", "2",
                                            "--rounds", "1"]},
    "step_time": {"full": ["--steps", "20", "--profile", "5"],
                  "smoke": ["--steps", "2", "--warmup", "1", "--batch", "32", "--profile", "1"]},
    "memory": {"full": [], "smoke": ["--models", "resnet18", "--batch", "32"]},
    "sync_time": {"full": [], "smoke": ["--rounds", "1", "--warmup", "0", "--local_steps", "2", "--batch", "16",
                                        "--profile"]},
    "ticket_speed": {"full": [], "smoke": ["--smoke"]},
    "fsdp_memory": {"full": [], "smoke": ["--model", "resnet18", "--batch", "16", "--image_size", "16"]},
}
# benchmarks whose JSON has a --runs_dir for per-rank records
WITH_RUNS_DIR = ("communication", "sync_time")
# start order with --jobs > 1: the longest first, so the last to start is short
START_ORDER = ("communication", "memory", "fsdp_memory", "sync_time", "ticket_speed", "step_time")


def run_benchmark(name: str, smoke: bool, results_dir: str) -> dict:
    """Run one benchmark script; its JSON, its printed output, the command and the wall time."""
    output = os.path.join(results_dir, f"{name}.json")
    cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), *BENCHMARKS[name]["smoke" if smoke else "full"],
           "--output", output]
    if name in WITH_RUNS_DIR:
        cmd += ["--runs_dir", results_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(output) as f:
        result = json.load(f)
    return {"command": " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) and c.startswith(ROOT) else c
                                for c in cmd[1:]),
            "wall_seconds": wall, "stdout": proc.stdout, "result": result}


# ------------------------------------------------------------------------------------------- table rows
def _row(benchmark: str, case: str, measure: str, value: float, shown: str, target: tuple | None = None,
         size_dependent: bool = True) -> dict:
    """One table row; ``target`` is (op, bound, shown) with op '>=' or '<='."""
    return {"benchmark": benchmark, "case": case, "measure": measure, "value": value, "shown": shown,
            "target": target, "size_dependent": size_dependent}


def communication_rows(result: dict) -> list[dict]:
    rows = []
    for r in result["table"]:
        case = f"{r['model']} n=S={r['n']}"
        a2a = r["alltoall"]
        targets = {}
        if r["model"] == "resnet18" and r["n"] == 4:
            targets = {"ddp": (">=", 40.0, ">= 40x"), "localsgd": (">=", 5.0, ">= 5x"), "star": (">=", 2.4, ">= 2.4x")}
        elif r["model"] == "resnet18" and r["n"] == 2:
            targets = {"star": (">=", 3.5, ">= 3.5x")}
        for key, label in (("ddp", "DDP"), ("localsgd", "local SGD"), ("star", "star")):
            rows.append(_row("communication", case, f"bytes {label} / LoFT alltoall", r[key] / a2a,
                             f"{r[key] / a2a:.2f}x", targets.get(key)))
        rows.append(_row("communication", case, "bytes LoFT allgather / alltoall", r["allgather"] / a2a,
                         f"{r['allgather'] / a2a:.2f}x"))
        worst = max(abs(r[m + "_measured_vs_exact"] - 1) for m in ("ddp", "localsgd", "allgather", "alltoall"))
        rows.append(_row("communication", case, "max |measured / analytic - 1| (4 methods)", worst,
                         f"{worst:.2%}", ("<=", 0.02, "<= 2%"), size_dependent=False))
    return rows


def step_time_rows(result: dict) -> list[dict]:
    rows = []
    for layout, r in result["layouts"].items():
        case = f"{result['model']} batch {result['batch']} {layout}"
        seconds = r["median_seconds"]
        for key, ratio in r["ratio_to_dense"].items():
            if key == "dense":
                continue
            target = ("<=", 0.40, "<= 0.40") if result["model"] == "resnet18" and key == "S=4" else None
            rows.append(_row("step time", f"{case} {key}", "step time sub / dense (median)", ratio,
                             f"{ratio:.3f} ({seconds[key]:.3f} s / {seconds['dense']:.3f} s)", target))
    return rows


def memory_rows(result: dict) -> list[dict]:
    targets = {2: ("<=", 0.65, "<= 0.65"), 4: ("<=", 0.50, "<= 0.50")}
    rows = []
    for r in result["rows"]:
        if r["S"] == 1:
            continue
        target = targets.get(r["S"]) if r["model"] == "resnet50" else None
        case = f"{r['model']} S={r['S']} batch {result['batch']}"
        dense = next(d for d in result["rows"] if d["model"] == r["model"] and d["S"] == 1)
        rows.append(_row("memory", case, "training memory sub / dense (exact)", r["ratio_exact"],
                         f"{r['ratio_exact']:.3f} ({r['exact']['total'] / MIB:.0f} / "
                         f"{dense['exact']['total'] / MIB:.0f} MiB)", target))
        rows.append(_row("memory", case, "training memory sub / dense (RSS)", r["ratio_rss"],
                         f"{r['ratio_rss']:.3f} ({r['rss_total'] / MIB:.0f} / {dense['rss_total'] / MIB:.0f} MiB)",
                         target))
    return rows


def fsdp_memory_rows(result: dict) -> list[dict]:
    case = f"{result['model']} S={result['workers']} D={result['replicas']} batch {result['batch']}"
    resnet50 = result["model"] == "resnet50"
    worst = max(result["table"], key=lambda t: t["total_ratio"])
    sync = result["sync_ratio_max"]
    half = 1 / result["replicas"]
    return [
        _row("fsdp memory", case, "params + grads + optimizer per rank fsdp / ddp", result["state_ratio_max"],
             f"{result['state_ratio_max']:.4f}", ("<=", 0.51, "<= 0.51") if resnet50 else None),
        _row("fsdp memory", case, "training memory per rank fsdp / ddp (exact)", worst["total_ratio"],
             f"{worst['total_ratio']:.3f} ({worst['fsdp']['total'] / MIB:.0f} / {worst['ddp']['total'] / MIB:.0f} MiB)",
             ("<=", 0.85, "<= 0.85") if resnet50 else None),
        _row("fsdp memory", case, "LoFT sync bytes per rank fsdp / ddp", sync, f"{sync:.4f}",
             ("in", (half * 0.98, half * 1.02), f"1/D = {half:.2f} +- 2%"), size_dependent=False),
    ]


def sync_time_rows(result: dict) -> list[dict]:
    case = f"{result['model']} {result['nproc']} procs L={result['local_steps']} batch {result['batch']}"
    rows = []
    for strategy, r in result["strategies"].items():
        m = r["median_seconds"]
        rows.append(_row("sync time", f"{case} {strategy}", "sync / compute per round (median)",
                         r["sync_over_compute"], f"{r['sync_over_compute']:.2%} ({m['sync']:.3f} s / "
                         f"{m['compute']:.2f} s)", ("<=", 0.10, "<= 10%")))
    return rows


def ticket_speed_rows(result: dict) -> list[dict]:
    """Per ticket and cell: speed-up / FLOP ratio (target: within 25%), and for r=0.8 hidden+stream at the
    throughput batch: the speed-up itself (target: >= 3x dense)."""
    rows = []
    latency_batch = min(result["batches"])
    for r in result["rows"]:
        what = "latency" if r["batch"] == latency_batch else "throughput"
        case = (f"{r['model']}@{r['size']} {r['scope']} r={r['ratio']:g} {r['engine']} {r['threads']}t "
                f"b{r['batch']}")
        if what == "throughput" and r["scope"] == "hidden+stream" and r["ratio"] == 0.8:
            rows.append(_row("ticket speed", case, "throughput compact / dense", r["speedup"],
                             f"{r['speedup']:.2f}x ({r['ticket_images_per_s']:.0f} / {r['dense_images_per_s']:.0f} "
                             "img/s)", (">=", 3.0, ">= 3x")))
        rows.append(_row("ticket speed", case, f"{what} speed-up / FLOP ratio", r["speedup_over_flop_ratio"],
                         f"{r['speedup_over_flop_ratio']:.2f} ({r['speedup']:.2f}x / {r['flop_ratio']:.2f}x)",
                         ("in", (0.75, 1.25), "0.75..1.25")))
    return rows


ROWS = {"communication": communication_rows, "step_time": step_time_rows, "memory": memory_rows,
        "fsdp_memory": fsdp_memory_rows,
        "sync_time": sync_time_rows, "ticket_speed": ticket_speed_rows}


def judge(row: dict, smoke: bool) -> str:
    if row["target"] is None:
        return "-"
    if smoke and row["size_dependent"]:
        return "not judged (smoke)"
    op, bound, _ = row["target"]
    if op == "in":
        low, high = bound
        if low <= row["value"] <= high:
            return "met"
        return f"MISSED by {low - row['value'] if row['value'] < low else row['value'] - high:.3g}"
    met = row["value"] >= bound if op == ">=" else row["value"] <= bound
    if met:
        return "met"
    miss = bound - row["value"] if op == ">=" else row["value"] - bound
    return f"MISSED by {miss:.3g}"


def format_table(rows: list[dict]) -> str:
    header = ("benchmark", "case", "measure", "value", "target", "status")
    cells = [header] + [(r["benchmark"], r["case"], r["measure"], r["shown"], r["target"][2] if r["target"] else "-",
                         r["status"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"platform": platform.platform(), "processor": cpu or platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "versions": {p: metadata.version(p) for p in ("torch", "timm", "numpy")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny versions (resnet18, 1 round, few steps)")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    ap.add_argument("--jobs", type=int, help="benchmarks at a time (default 1; 2 with --smoke)")
    ap.add_argument("--output", help="combined JSON; the table goes next to it as .txt (default "
                                     "docs/results/bench.json, or benchmarks/results/smoke/bench.json with --smoke)")
    ap.add_argument("--results_dir", help="each benchmark's JSON and per-rank records (default benchmarks/results, "
                                          "or the folder of --output with --smoke)")
    args = ap.parse_args()
    smoke_dir = os.path.join(HERE, "results", "smoke")
    args.output = args.output or (os.path.join(smoke_dir, "bench.json") if args.smoke
                                  else os.path.join(ROOT, "docs", "results", "bench.json"))
    args.results_dir = args.results_dir or (os.path.dirname(os.path.abspath(args.output)) if args.smoke
                                            else os.path.join(HERE, "results"))
    jobs = args.jobs or (2 if args.smoke else 1)
    for d in (args.results_dir, os.path.dirname(os.path.abspath(args.output))):
        os.makedirs(d, exist_ok=True)
    t0, load_before = time.time(), os.getloadavg()
    print(f"{'smoke ' if args.smoke else ''}benchmarks {', '.join(args.only)} ({jobs} at a time); each prints its "
          f"own table, then the combined one follows\n", flush=True)
    runs = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        started = {name: pool.submit(run_benchmark, name, args.smoke, args.results_dir)
                   for name in START_ORDER if name in args.only}
        futures = {name: started[name] for name in args.only}
        for name, fut in futures.items():
            runs[name] = fut.result()
            print(f"== {runs[name]['command']} ({runs[name]['wall_seconds']:.0f} s)\n{runs[name]['stdout']}", flush=True)
    rows = [row for name in args.only for row in ROWS[name](runs[name]["result"])]
    for row in rows:
        row["status"] = judge(row, args.smoke)
    wall = time.time() - t0
    title = (f"loft_ext benchmarks{' (SMOKE: tiny sizes, size-dependent targets not judged)' if args.smoke else ''}"
             f"; {platform.platform()}, {os.cpu_count()} CPUs, torch {metadata.version('torch')}, "
             f"timm {metadata.version('timm')}; {wall:.0f} s\nload average (1 min) at start / end: "
             f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a start value above 0: other "
             f"work was running; times and time ratios are then less certain, bytes and memory are not affected)")
    table = f"{title}\n\n{format_table(rows)}\n"
    print(table)
    command = " ".join([os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0],
                        *sys.argv[1:]])
    with open(os.path.splitext(args.output)[0] + ".txt", "w") as f:
        f.write(table)
    with open(args.output, "w") as f:
        json.dump({"command": f"python {command}", "smoke": args.smoke, "jobs": jobs, "machine": machine(),
                   "load_average_before_after": [load_before, os.getloadavg()], "seconds": wall,
                   "table": rows, "benchmarks": runs}, f, indent=1)
    print(f"table in {os.path.splitext(args.output)[0]}.txt, every raw number in {args.output}")


if __name__ == "__main__":
    main()
