"""A user's own loop on the public LoFT helper, for the tests (tests/test_library.py).

SGD or AdamW, plain cross-entropy, one BatchStream per worker (the recipe's data order), constant lr.
In one process it trains every simulated worker (``loft.models``); under torchrun / accelerate launch
each process trains its own. After every round it appends the assembled model's hash to
``<out>/hashes-rank<r>.jsonl`` in the recipe's ``--debug_hashes`` format, so the two can be compared.
``--save_at K`` saves ``accelerator.save_state`` after K steps and exits; ``--resume DIR`` continues.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import loft_ext  # noqa: E402
from loft_ext.data import BatchStream, load_digits_dataset  # noqa: E402
from loft_ext.engine.debug import model_hash  # noqa: E402


class AssembledHashes(loft_ext.Plugin):
    name = "assembled_hashes"

    def __init__(self, path):
        self.path = path

    def wants_model(self, run, round_index, epoch_end):
        return True

    def on_after_sync(self, run, round_index, model):
        with open(self.path, "a") as f:
            f.write(json.dumps({"round": round_index, "assembled": model_hash(model)}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--local_steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--optimizer_state", default=loft_ext.LoFTConfig().optimizer_state)  # the recipe's default
    p.add_argument("--sync", default="allgather")
    p.add_argument("--preset", default=loft_ext.LoFTConfig().preset)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--save_at", type=int, default=0)
    p.add_argument("--resume", default="")
    args = p.parse_args(argv)

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(args.seed)
    data = load_digits_dataset(32)
    model = loft_ext.create_model(args.model, data.num_classes, data.in_chans)
    os.makedirs(args.out, exist_ok=True)
    rank = accelerator.process_index
    config = loft_ext.LoFTConfig(args.workers, args.local_steps, args.preset, args.sync, args.optimizer_state,
                                 args.seed)
    loft = loft_ext.LoFT(accelerator, model, config, input_shape=(1, data.in_chans, 32, 32),
                         plugins=[AssembledHashes(os.path.join(args.out, f"hashes-rank{rank}.jsonl"))])
    if args.optimizer == "sgd":
        optimizers = [torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
                      for m in loft.models]
    else:
        optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in loft.models]
    loft.attach(*optimizers)
    accelerator.register_for_checkpointing(loft)
    replica = loft.grid.data_index if loft.grid is not None else 0
    replicas = loft.grid.replicas if loft.grid is not None else 1
    streams = {i: BatchStream(data.train, args.batch_size, i, args.workers, "own-shuffle", args.seed,
                              replica=replica, replicas=replicas) for i in loft.worker_indices}
    start = 0
    if args.resume:
        accelerator.load_state(args.resume)
        start = loft.state.round_index * args.local_steps + loft.state.local_step
        for s in streams.values():  # the streams' positions follow from the steps done
            s.load_state_dict({"epoch": start // s.steps_per_epoch, "consumed": start % s.steps_per_epoch})
    for step in range(start, args.rounds * args.local_steps):
        losses = []
        for index, module, opt in zip(loft.worker_indices, loft.models, optimizers):
            x, y = streams[index].next()
            loss = F.cross_entropy(module(x), y)
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            losses.append(loss)
        loft.step(losses)
        if args.save_at and step + 1 == args.save_at:
            accelerator.save_state(os.path.join(args.out, "state"))
            return 0
    with loft.full_model() as full:
        final = model_hash(full)
    if accelerator.is_main_process:
        with open(os.path.join(args.out, "final.json"), "w") as f:
            json.dump({"hash": final, "round": loft.state.round_index, "world": accelerator.num_processes}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
