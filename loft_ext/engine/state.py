"""The LoFT helper's state: its progress (JSON, for the recipe's checksummed checkpoints) and everything
needed to resume a user's loop bit for bit through ``accelerator.save_state`` / ``load_state``.

Accelerate writes a registered object's ``state_dict`` from the main process only, so ``state_dict``
gathers every rank's part (its sub-network, optimizer, strategy tensors: what only that rank holds)
and ``load_state_dict`` takes this rank's part back. Both are collectives in a distributed run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError
from ..errors import ConfigError


class LoFTState:
    """Mixin of :class:`loft_ext.LoFT`: ``progress_state``, ``state_dict`` and their inverses."""

    def progress_state(self) -> dict:
        """The run's and every plugin's state (JSON-serialisable); plugins see ``on_checkpoint_save``."""
        s = self.state
        state = {"loop": {"round_index": s.round_index, "epoch": s.epoch, "history": s.history,
                          "tickets": s.tickets, "worker_losses": s.worker_losses},
                 "plugins": {p.name: p.state_dict() for p in self.plugins}}
        self.emit("on_checkpoint_save", state)
        return state

    def load_progress_state(self, state: dict) -> None:
        loop = state["loop"]
        self.state.round_index, self.state.epoch = loop["round_index"], loop["epoch"]
        self.state.history, self.state.tickets = list(loop["history"]), list(loop["tickets"])
        if "worker_losses" in loop:
            self.state.worker_losses = [list(v) for v in loop["worker_losses"]]
        for p in self.plugins:
            p.load_state_dict(state["plugins"].get(p.name, {}))
        self.emit("on_checkpoint_load", state)

    # ------------------------------------------------------------------ accelerate checkpointing
    def _my_state(self) -> dict:
        engine = self.engine
        alltoall = hasattr(engine.strategy, "slabs")
        if any(w.sharded is not None for w in engine.workers) and self._round_open and self.state.local_step:
            raise ConfigError("a --replicas fsdp LoFT state is saved between rounds only (its optimizer state "
                              "lives in FSDP shards): save right after loft.step() returns True, or use "
                              "replicas ddp")
        mine = {
            "rank": self.grid.rank if self.grid is not None else 0,
            "progress": self.progress_state(),
            "round_open": self._round_open,
            "local_step": self.state.local_step,
            "round_losses": self.state.round_losses,
            "strategy": engine.strategy.state_dict(**({"weights": True} if alltoall else {})),
            "workers": [{"index": w.index,
                         "model": {k: v.detach().cpu().clone() for k, v in w.model.state_dict().items()},
                         "optimizer": w.optimizer.state_dict() if w.optimizer is not None else None}
                        for w in engine.workers],
        }
        if not alltoall and mine["rank"] == 0:  # every rank holds the same full model: rank 0's suffices
            mine["full"] = {k: v.detach().cpu().clone() for k, v in engine.full.state_dict().items()}
        return mine

    def state_dict(self) -> dict:
        """Everything to resume bit for bit, mid-round included (for ``accelerator.register_for_checkpointing``)."""
        mine = self._my_state()
        if self.grid is None:
            return {"world": 1, "ranks": [mine]}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return {"world": len(everyone), "ranks": everyone}

    def load_state_dict(self, state: dict) -> None:
        world = self.grid.world_size if self.grid is not None else 1
        if state.get("world") != world:
            raise CheckpointError(f"this LoFT state was saved by {state.get('world')} process(es), this run has "
                                  f"{world}; resume with the same launch")
        rank = self.grid.rank if self.grid is not None else 0
        mine = state["ranks"][rank]
        full = state["ranks"][0].get("full")
        engine = self.engine
        device = next(engine.workers[0].model.parameters()).device
        if full is not None:
            engine.full.load_state_dict({k: v.to(device) for k, v in full.items()})
        if hasattr(engine.strategy, "owner"):
            engine.strategy.owner = engine.draw(mine["progress"]["loop"]["round_index"])
        engine.strategy.load_state_dict(mine["strategy"], device)
        self.load_progress_state(mine["progress"])
        if mine["round_open"]:
            self.begin_round(self._lr)
        with torch.no_grad():
            for w, saved in zip(engine.workers, mine["workers"]):
                # under fsdp a state is saved at a round boundary only, where the shards hold what the full
                # model's slices hold (loaded by begin_round) and the plain copy's parameters are released
                if w.sharded is None:
                    w.model.load_state_dict({k: v.to(device) for k, v in saved["model"].items()})
                if w.optimizer is not None and saved["optimizer"] is not None:
                    w.optimizer.load_state_dict(saved["optimizer"])
        self.state.local_step = mine["local_step"]
        self.state.round_losses = [list(v) for v in mine["round_losses"]]
