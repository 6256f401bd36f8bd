"""The filter distance of LoFT (when has the ticket emerged?) and the plugins that record and use it.

For one layer with n filters and two checkpoints A and B, rank the filters by the L2 norm of their
weights, largest first (position 1 = largest; equal norms keep index order, so ties are
deterministic). sigma(i) = position in B's ranking of the filter at position i of A's ranking.

    F(A, B) = sum_{i=1..n} (1/i) |ln i - ln sigma(i)|

F = 0 iff the rankings agree; F is not symmetric. Normalised value: F / E_n, where
E_n = sum_i (1/i) (1/n) sum_j |ln i - ln j| is the *exact* expectation of F when sigma is a uniformly
random permutation (sigma(i) is uniform on 1..n for every i; linearity of expectation). Model-level
aggregate: the mean of the normalised values of the recorded layers (each layer counts once, whatever
its width).
"""
from __future__ import annotations

import functools
import json
import os

import torch
import torch.nn as nn

from .base import Plugin


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every output filter (row) of a conv/linear weight."""
    return weight.detach().float().flatten(1).norm(dim=1).cpu()


def ranking(norms: torch.Tensor) -> torch.Tensor:
    """Filter indices from the largest norm to the smallest; ties keep index order."""
    return torch.sort(norms, descending=True, stable=True).indices


def filter_distance(rank_a: torch.Tensor, rank_b: torch.Tensor) -> float:
    """F(A, B) for two rankings (as returned by :func:`ranking`) of the same n filters."""
    n = len(rank_a)
    position_in_b = torch.empty(n, dtype=torch.float64)
    position_in_b[rank_b] = torch.arange(1, n + 1, dtype=torch.float64)
    sigma = position_in_b[rank_a]
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((i.log() - sigma.log()).abs() / i).sum())


@functools.lru_cache(maxsize=None)
def expected_distance(n: int) -> float:
    """Exact E[F] under a uniformly random permutation of n filters."""
    logs = torch.arange(1, n + 1, dtype=torch.float64).log()
    mean_abs = (logs[:, None] - logs[None, :]).abs().mean(dim=1)
    return float((mean_abs / torch.arange(1, n + 1, dtype=torch.float64)).sum())


def normalised_distance(rank_a: torch.Tensor, rank_b: torch.Tensor) -> float:
    expected = expected_distance(len(rank_a))
    return filter_distance(rank_a, rank_b) / expected if expected > 0 else 0.0


def distance_layers(model: nn.Module, plan, which: str) -> list[str]:
    """Layers whose filters are ranked: producers of split groups (``split``) or every conv (``all``)."""
    if which == "split":
        names = [g.name for g in plan.split]
        modules = dict(model.named_modules())
        return [n for n in names if isinstance(modules.get(n), (nn.Conv2d, nn.Linear))]
    if which == "all":
        return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels > 1]
    raise ValueError(f"unknown distance layers {which!r}; use split or all")


class FilterDistance(Plugin):
    """Records filter rankings of the assembled model every ``every`` rounds (0: every epoch end) and
    reports per-layer distances between consecutive records; at the end, per-layer pairwise matrices
    (the paper's heat-maps) and the distance of every record to the last (the "distance to the winning
    filters" curve), as JSON, PNG and W&B table/images."""

    name = "filter_distance"

    def __init__(self, layers: str = "split", every: int = 0, plot: bool = True):
        self.which, self.every, self.plot = layers, every, plot
        self.layers: list[str] = []
        self.rounds: list[int] = []
        self.rankings: dict[str, list[list[int]]] = {}
        self.consecutive: list[dict] = []   # per record after the first: {layer: normalised}, aggregate

    def on_fit_start(self, loop) -> None:
        if not self.layers:
            self.layers = distance_layers(loop.engine.full, loop.engine.plan, self.which)
            self.rankings = {n: [] for n in self.layers}

    def wants_model(self, loop, round_index: int, epoch_end: bool) -> bool:
        return (round_index + 1) % self.every == 0 if self.every > 0 else epoch_end

    def record(self, model: nn.Module, round_number: int) -> None:
        modules = dict(model.named_modules())
        for n in self.layers:
            self.rankings[n].append(ranking(filter_norms(modules[n].weight)).tolist())
        self.rounds.append(round_number)

    def on_after_sync(self, loop, round_index: int, model) -> None:
        if model is None or not self.wants_model(loop, round_index, loop.is_epoch_end(round_index)):
            return
        self.record(model, round_index + 1)
        if len(self.rounds) < 2:
            return
        layer_values = {n: normalised_distance(torch.tensor(r[-2]), torch.tensor(r[-1]))
                        for n, r in self.rankings.items()}
        raw = {n: filter_distance(torch.tensor(r[-2]), torch.tensor(r[-1])) for n, r in self.rankings.items()}
        aggregate = sum(layer_values.values()) / max(len(layer_values), 1)
        self.consecutive.append({"round": round_index + 1, "aggregate": aggregate, "layers": layer_values,
                                 "raw": raw})
        loop.logger.log({"distance/consecutive": aggregate}, step=round_index + 1)

    # ------------------------------------------------------------------ products
    def aggregate_between(self, i: int, j: int) -> float:
        """Model-level aggregate distance from record i to record j."""
        values = [normalised_distance(torch.tensor(r[i]), torch.tensor(r[j])) for r in self.rankings.values()]
        return sum(values) / max(len(values), 1)

    def pairwise(self, layer: str) -> list[list[float]]:
        """Normalised F(record i, record j) for one layer (rows: A = record i)."""
        r = [torch.tensor(x) for x in self.rankings[layer]]
        return [[normalised_distance(a, b) for b in r] for a in r]

    def to_last(self) -> dict[str, list[float]]:
        """Per layer (and ``aggregate``), distance of every record to the last one."""
        out = {n: [normalised_distance(torch.tensor(x), torch.tensor(r[-1])) for x in r]
               for n, r in self.rankings.items()}
        k = len(self.rounds)
        out["aggregate"] = [sum(out[n][i] for n in self.layers) / max(len(self.layers), 1) for i in range(k)]
        return out

    def on_fit_end(self, loop, metrics: dict) -> None:
        logger = loop.logger
        if logger.run_dir is None or len(self.rounds) < 2:
            return
        from ..plotting import plot_curves, plot_heatmaps

        folder = os.path.join(logger.run_dir, "distance")
        os.makedirs(folder, exist_ok=True)
        step = loop.state.round_index
        matrices = {n: self.pairwise(n) for n in self.layers}
        to_last = self.to_last()
        rows = [[n, len(self.rankings[n][0]), self.consecutive[-1]["raw"][n], self.consecutive[-1]["layers"][n],
                 to_last[n][0]] for n in self.layers]
        logger.log_table("distance/layers", ["layer", "filters", "last_raw", "last_normalised",
                                             "first_to_last_normalised"], rows, step)
        with open(os.path.join(folder, "distances.json"), "w") as f:
            json.dump({"rounds": self.rounds, "consecutive": self.consecutive, "pairwise": matrices,
                       "to_last": to_last}, f)
        if self.plot:
            heat = plot_heatmaps(matrices, self.rounds, os.path.join(folder, "heatmaps.png"))
            curve = plot_curves({"to last (aggregate)": to_last["aggregate"]}, self.rounds,
                                os.path.join(folder, "distance_to_last.png"),
                                ylabel="normalised filter distance")
            consecutive = plot_curves({"consecutive (aggregate)": [c["aggregate"] for c in self.consecutive]},
                                      self.rounds[1:], os.path.join(folder, "distance_consecutive.png"),
                                      ylabel="normalised filter distance")
            for key, path in (("distance/heatmaps", heat), ("distance/to_last", curve),
                              ("distance/consecutive_curve", consecutive)):
                logger.log_image(key, path, step)

    def state_dict(self) -> dict:
        return {"layers": self.layers, "rounds": self.rounds, "rankings": self.rankings,
                "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.layers, self.rounds = list(state["layers"]), list(state["rounds"])
            self.rankings = {k: list(v) for k, v in state["rankings"].items()}
            self.consecutive = list(state["consecutive"])


def window_indices(rounds: list[int], window: int, window_epochs: float, rounds_per_epoch: int) -> list[int]:
    """The rule's window for the newest of the records taken at ``rounds``: indices of the older records
    it is compared with (the last ``window`` - 1, or, with ``window_epochs`` > 0, those at most that many
    epochs older); empty while the window is not full. Pure, so recorded runs can be replayed."""
    k = len(rounds)
    if window_epochs <= 0:
        return list(range(k - window, k - 1)) if k >= window else []
    span = window_epochs * rounds_per_epoch
    if k < 2 or rounds[-1] - rounds[0] < span:
        return []
    return [i for i in range(k - 1) if rounds[-1] - rounds[i] <= span]


def lr_gate_open(lr: float, peak_lr: float, lr_below: float) -> bool:
    """Whether a record taken at learning rate ``lr`` is checked: ``lr`` is at most ``lr_below`` times the
    highest learning rate so far (always with ``lr_below`` = 1). Pure, so recorded runs can be replayed."""
    return lr_below >= 1 or lr <= lr_below * peak_lr * (1 + 1e-9)


class DistanceStop(Plugin):
    """Ticket-emergence rule on the filter distance: the aggregate normalised distance from the newest
    record to each older record of the window is below ``eps``. The window is the last ``window``
    records, or, with ``window_epochs`` > 0, every record of the last ``window_epochs`` epochs (checked
    only once that much training is recorded). A window in epochs keeps its meaning when records are
    dense (every few rounds, for resolution): 5 records 2 rounds apart span a few hundred steps, over
    which a ranking barely moves whether or not the ticket has emerged. With ``lr_below`` < 1 a record
    is checked only when its round's learning rate is at most that fraction of the highest seen so far:
    a ranking can hold still on a high-lr plateau and change at the schedule's first drop, so a rule
    that fires on the plateau draws a ticket the drop would have changed (docs/results.md, "Ticket
    study"). Fires once; stops pretraining when ``stop`` is set, otherwise only reports."""

    name = "distance_stop"

    def __init__(self, recorder: FilterDistance, window: int = 5, eps: float = 0.1, stop: bool = False,
                 window_epochs: float = 0.0, lr_below: float = 1.0):
        if window < 2:
            raise ValueError(f"the distance window must hold >= 2 records (got {window})")
        if window_epochs < 0:
            raise ValueError(f"the distance window in epochs must be >= 0 (got {window_epochs})")
        if not 0 < lr_below <= 1:
            raise ValueError(f"lr_below must be in (0, 1], a fraction of the highest learning rate (got {lr_below})")
        self.recorder, self.window, self.eps, self.stop = recorder, window, eps, stop
        self.window_epochs, self.lr_below = window_epochs, lr_below
        self.fired_at: int | None = None
        self.last_checked = 0
        self.peak_lr = 0.0

    def window_records(self, rounds_per_epoch: int) -> list[int]:
        """Indices of the older records the newest is compared with; empty while the window is not full."""
        return window_indices(self.recorder.rounds, self.window, self.window_epochs, rounds_per_epoch)

    def on_after_sync(self, loop, round_index: int, model) -> None:
        gated = self.lr_below < 1
        if gated:
            lr = getattr(loop, "lr", None)
            if lr is None:
                raise ValueError("the filter-distance rule's lr_below needs the round's learning rate: pass lr to "
                                 "LoFT.begin_round (or set it in the workers' optimizers), or use lr_below=1")
            self.peak_lr = max(self.peak_lr, lr)
        k = len(self.recorder.rounds)
        if k == self.last_checked:
            return
        older = self.window_records(loop.rounds_per_epoch)
        if not older:
            return
        self.last_checked = k
        if gated and not lr_gate_open(lr, self.peak_lr, self.lr_below):
            return
        dists = [self.recorder.aggregate_between(k - 1, i) for i in older]
        loop.logger.log({"distance/window_max": max(dists)}, step=round_index + 1)
        if self.fired_at is None and max(dists) < self.eps:
            self.fired_at = round_index + 1
            loop.ticket_found(self.name, {"window_distances": dists, "eps": self.eps})
            if self.stop:
                window = (f"{self.window_epochs:g} epochs" if self.window_epochs > 0
                          else f"the last {self.window} records")
                loop.request_stop(f"filter distance below {self.eps} over {window}")

    def state_dict(self) -> dict:
        return {"fired_at": self.fired_at, "last_checked": self.last_checked, "peak_lr": self.peak_lr}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.fired_at, self.last_checked = state["fired_at"], state["last_checked"]
            self.peak_lr = state.get("peak_lr", 0.0)  # absent in checkpoints from before lr_below
