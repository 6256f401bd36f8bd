"""What a pretraining run spent: bytes moved per communication phase, and training samples processed.

Both go into ``summary.json`` and every ticket row, so two rows of the ticket table can be compared on
the same footing:

- ``pretrain_bytes``: bytes this rank (rank 0, the one that writes the summary) *sent* in every phase
  of pretraining that moved bytes, summed: ``sync`` (the LoFT exchange and the replicas' BatchNorm
  statistics), ``dp_grad`` (the gradient all-reduce of D > 1 data-parallel replicas: all of a dense
  run's traffic), ``shard_gather`` (``--replicas fsdp``: a worker's D shards put together after the sync), ``assemble`` (gathering the full model for evaluations, detectors and checkpoints)
  and ``metric`` (losses and stop votes). ``pretrain_bytes_by_phase`` holds the breakdown; the numbers
  are the counters of ``comm-rank0.json`` (``measured``), nothing estimated.
- ``samples_per_worker``: training samples one process (or one simulated worker) passed forward and
  backward, ``rounds x L x batch``; ``samples_total``: over all S x D of them. A dense run on N
  processes is data-parallel (D = N): its global batch is N times larger and an epoch takes 1/N of
  the steps, while LoFT with S = N gives every worker the whole epoch.
"""
from __future__ import annotations


def bytes_by_phase(totals: dict) -> dict[str, float]:
    """``{phase: bytes sent}`` of every phase in ``Comm.totals()`` that moved bytes."""
    return {phase: float(c["bytes_sent"]) for phase, c in sorted(totals.items()) if c.get("bytes_sent", 0) > 0}


def pretrain_budget(totals: dict, rounds: int, local_steps: int, batch_size: int, workers: int,
                    replicas: int) -> dict:
    """The summary fields of a pretraining run: bytes per phase and in all, samples per worker and in all."""
    phases = bytes_by_phase(totals)
    per_worker = rounds * local_steps * batch_size
    return {"pretrain_bytes": float(sum(phases.values())), "pretrain_bytes_by_phase": phases,
            "batch_size": batch_size, "samples_per_worker": per_worker,
            "samples_total": per_worker * workers * replicas}


def row_budget(pre: dict) -> dict:
    """The budget fields of a ticket row from the pretraining summary ``pre`` (summaries written before
    these fields existed counted only the sync phase)."""
    return {"pretrain_bytes": pre.get("pretrain_bytes", pre.get("sync_bytes_sent", 0.0)),
            "pretrain_bytes_by_phase": pre.get("pretrain_bytes_by_phase"),
            "samples_per_worker": pre.get("samples_per_worker"), "samples_total": pre.get("samples_total")}
