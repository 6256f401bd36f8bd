"""One W&B run per ticket, and W&B Artifacts that link pretrained model -> ticket -> fine-tuning.

Why: the fine-tuning run of a pipeline holds every ticket under keys that embed the ratio
(``ticket_r0.5/test_acc``), which W&B's runs table cannot group or sort. A ticket run
(``job_type="ticket"``, in the experiment's group) carries one ticket's numbers under the same config
keys (:data:`TICKET_CONFIG_KEYS`) and summary keys (:data:`TICKET_SUMMARY_KEYS`) as every other
ticket; a value the pipeline does not know is ``None``, never guessed.

Artifacts: the pretraining run logs ``model.safetensors`` as ``model-<run>`` (type ``model``); each
ticket run logs ``ticket-<run>-<ticket>`` (type ``ticket``: masks and, for structured tickets, the
compact model) and the fine-tuning run uses the ticket artifacts. W&B records "uses" edges with
``use_artifact`` only online: in offline mode wandb 0.31 refuses it, so the edges are also written
as artifact metadata (``pretrained_model``: name and sha256 of the file) and as the fine-tuning run's
summary key ``ticket_artifacts``, which hold offline and online alike (docs/wandb.md).
"""
from __future__ import annotations

import hashlib
import os
import re

TICKET_JOB_TYPE = "ticket"
MARKER = "wandb_ticket_run.txt"  # in the ticket directory: its W&B run was logged (not again on a rerun)

# identical for every ticket, so the runs table groups by any of them
TICKET_CONFIG_KEYS = ("method", "model", "dataset", "seed", "S", "L", "D", "optimizer_state", "ticket", "scope",
                      "score", "ratio", "rewind", "finetune_epochs", "oneshot_bn_batches", "detector", "pretrain_run")
TICKET_SUMMARY_KEYS = ("params", "kept_params", "flops", "kept_flops", "flop_ratio", "speedup",
                       "oneshot_test_acc", "test_acc", "pretrain_test_acc",
                       "pretrain_bytes", "finetune_bytes", "total_bytes",
                       "epochs", "rounds", "detector_round", "detector_epoch",
                       "samples_per_worker", "samples_total", "pretrain_wall_s", "finetune_wall_s")


def artifact_name(*parts: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'; anything else becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))[:128]


def model_artifact_name(run_dir: str) -> str:
    return artifact_name("model", os.path.basename(os.path.normpath(run_dir)))


def ticket_artifact_name(run_dir: str, ticket_dir: str) -> str:
    return artifact_name("ticket", os.path.basename(os.path.normpath(run_dir)),
                         os.path.basename(os.path.normpath(ticket_dir)))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ticket_config(row: dict, *, dataset: str, seed: int, rewind: str, finetune_epochs: int,
                  pretrain_run: str, oneshot_bn_batches: int | None = None) -> dict:
    """The ticket run's config: the row's settings plus what the row does not hold (``oneshot_bn_batches``:
    None when the ticket was fine-tuned, which re-estimates BN statistics anyway)."""
    known = {**row, "dataset": dataset, "seed": seed, "rewind": rewind, "finetune_epochs": finetune_epochs,
             "oneshot_bn_batches": oneshot_bn_batches, "pretrain_run": pretrain_run}
    return {key: known.get(key) for key in TICKET_CONFIG_KEYS}


def ticket_summary(row: dict) -> dict:
    """The ticket run's summary: the row's numbers (rows written before a key existed give None)."""
    return {key: row.get(key) for key in TICKET_SUMMARY_KEYS}


def log_model_artifact(run, run_dir: str, summary: dict) -> str:
    """The pretraining run logs its assembled model (``model.safetensors``) as a ``model`` artifact."""
    import wandb

    path = os.path.join(run_dir, "model.safetensors")
    name = model_artifact_name(run_dir)
    artifact = wandb.Artifact(name, type="model", metadata={
        "file": "model.safetensors", "sha256": file_sha256(path), "run_dir": os.path.abspath(run_dir),
        **{k: summary.get(k) for k in ("method", "workers", "local_steps", "replicas", "rounds_done", "test_acc")}})
    artifact.add_file(path, policy="immutable")  # no staging copy; the file stays until `wandb sync`
    run.log_artifact(artifact)
    return name


def _ticket_files(ticket_dir: str) -> list[tuple[str, str]]:
    """(path, name in the artifact) of the files that make the ticket: masks, and the compact model."""
    names = ["masks.safetensors", "masks.json", "result.json", os.path.join("compact", "compact.safetensors"),
             os.path.join("compact", "compact.json")]
    return [(os.path.join(ticket_dir, n), n) for n in names if os.path.isfile(os.path.join(ticket_dir, n))]


def log_ticket_run(*, project: str, group: str, mode: str, run_dir: str, row: dict, config: dict,
                   summary: dict):
    """One finished W&B run (job_type ``ticket``) for the ticket in ``row["dir"]``, logging its ticket
    artifact; returns the artifact (the fine-tuning run uses it). Main process only."""
    import wandb

    ticket_dir = row["dir"]
    model_path = os.path.join(run_dir, "model.safetensors")
    pretrained = {"artifact": model_artifact_name(run_dir), "file": "model.safetensors",
                  "sha256": file_sha256(model_path)}
    # a second run beside the open fine-tuning run, which stays the one Accelerate logs to
    run = wandb.init(project=project, group=group, job_type=TICKET_JOB_TYPE, dir=run_dir, mode=mode,
                     name=f"{os.path.basename(os.path.normpath(run_dir))}-{os.path.basename(ticket_dir)}",
                     config=config, reinit="create_new")
    try:
        if mode == "online":  # the "uses" edge; offline wandb refuses use_artifact (the metadata holds it)
            try:
                run.use_artifact(f"{pretrained['artifact']}:latest", type="model")
            except wandb.errors.Error:  # pretrained without W&B: the metadata still names the file
                pretrained["use_artifact"] = "not found on the server"
        artifact = wandb.Artifact(ticket_artifact_name(run_dir, ticket_dir), type="ticket",
                                  metadata={"pretrained_model": pretrained, **config, **summary})
        for path, name in _ticket_files(ticket_dir):
            artifact.add_file(path, name=name, policy="immutable")
        run.summary.update(summary)
        run.log_artifact(artifact)
    finally:
        run.finish()
    with open(os.path.join(ticket_dir, MARKER), "w") as f:
        f.write(run.id + "\n")
    return artifact


def log_ticket_runs(finetune_run, rows: list[dict], *, project: str, group: str, mode: str, run_dir: str,
                    dataset: str, seed: int, rewind: str, finetune_epochs: int,
                    oneshot_bn_batches: int | None = None) -> list:
    """A ticket run for every row whose ticket has none yet (a rerun does not log a ticket twice), then
    the fine-tuning run ``finetune_run`` uses their artifacts. Returns the artifacts."""
    artifacts = []
    for row in rows:
        if os.path.exists(os.path.join(row["dir"], MARKER)):
            continue
        config = ticket_config(row, dataset=dataset, seed=seed, rewind=rewind, finetune_epochs=finetune_epochs,
                               pretrain_run=os.path.basename(os.path.normpath(run_dir)),
                               oneshot_bn_batches=oneshot_bn_batches)
        artifacts.append(log_ticket_run(project=project, group=group, mode=mode, run_dir=run_dir, row=row,
                                        config=config, summary=ticket_summary(row)))
    use_tickets(finetune_run, artifacts, mode)
    return artifacts


def use_tickets(run, artifacts: list, mode: str) -> None:
    """The fine-tuning run uses the ticket artifacts: a W&B edge online, and always its summary key
    ``ticket_artifacts`` (the names), which is what offline runs keep."""
    if mode == "online":
        for artifact in artifacts:
            run.use_artifact(artifact)
    run.summary["ticket_artifacts"] = sorted(a.name.split(":")[0] for a in artifacts)
