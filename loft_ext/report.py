"""The ticket comparison table (pipeline end, and ``recipes/compare_runs.py`` over several runs)."""
from __future__ import annotations

COLUMNS = [("method", "method", "{}"), ("model", "model", "{}"), ("S", "S", "{}"), ("D", "D", "{}"),
           ("epochs", "pre-ep", "{:g}"), ("samples_per_worker", "samples/wkr", "{:d}"),
           ("samples_total", "samples", "{:d}"), ("detector_round", "fired@", "{}"), ("ticket", "ticket", "{}"),
           ("score", "score", "{}"), ("scope", "scope", "{}"), ("ratio", "ratio", "{:g}"),
           ("kept_params", "params(M)", "{:.3f}"), ("kept_flops", "GFLOPs", "{:.3f}"),
           ("flop_ratio", "FLOPx", "{:.2f}"), ("speedup", "speed-up", "{:.2f}x"), ("test_acc", "test acc", "{:.2%}"),
           ("pretrain_bytes", "pre MiB", "{:.1f}"), ("total_bytes", "total MiB", "{:.1f}"),
           ("finetune_wall_s", "ft s", "{:.0f}")]
SCALE = {"kept_params": 1e-6, "kept_flops": 1e-9, "pretrain_bytes": 2.0 ** -20, "total_bytes": 2.0 ** -20}


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one row per ticket."""
    header = [title for _, title, _ in COLUMNS]
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = r.get(key)
            if value is None:
                cells.append("-")
            else:
                cells.append(fmt.format(value * SCALE[key]) if key in SCALE else fmt.format(value))
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body]
    return "\n".join(lines)
