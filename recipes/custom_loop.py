#!/usr/bin/env python
"""A plain Accelerate training loop that adopts LoFT: the lines with a LoFT comment are all it takes
(docs/library.md shows the loop without them, side by side).

Digits (scikit-learn's, built in), a timm CNN, cross-entropy with label smoothing, AdamW, a cosine
schedule, bf16 autocast where the device has it, gradient clipping. One LoFT worker per process:
  torchrun --nproc_per_node 2 recipes/custom_loop.py              (S=2 filter workers)
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/custom_loop.py
  python recipes/custom_loop.py --workers 1                        (S=1: plain training through LoFT)
"""
import argparse
import json
import math
import os
import sys

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import loft_ext  # noqa: E402  # LoFT
from loft_ext.data import load_digits_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="timm model name (pretrained=False)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over each process's share of the data")
    parser.add_argument("--batch_size", type=int, default=64, help="batch size per process")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine to 0)")
    parser.add_argument("--label_smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping (max norm)")
    parser.add_argument("--workers", type=int, default=0, help="S filter workers (0: one per process)")  # LoFT
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and data order")
    parser.add_argument("--output", default="", help="write the final test accuracy to this JSON file")
    args = parser.parse_args(argv)

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    data = load_digits_dataset(32)
    model = timm.create_model(args.model, pretrained=False, num_classes=data.num_classes, in_chans=data.in_chans)
    config = loft_ext.LoFTConfig(workers=args.workers or accelerator.num_processes, local_steps=4)  # LoFT
    loft = loft_ext.LoFT(accelerator, model, config, input_shape=(1, data.in_chans, 32, 32))  # LoFT
    model = loft.model  # LoFT: this process's narrower sub-network
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loft.attach(optimizer)  # LoFT
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(data.test, batch_size=256)
    optimizer, loader = accelerator.prepare(optimizer, loader)  # LoFT: the model is not prepared
    total_steps = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))

    def evaluate(net) -> float:
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(accelerator.device), y.to(accelerator.device)
                correct += (net(x).argmax(1) == y).sum().item()
                total += len(y)
        return correct / total

    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            with accelerator.autocast():
                loss = F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            loft.step(loss)  # LoFT: every L steps write back, sync, redraw the partition
        with loft.full_model() as full:  # LoFT: the assembled model
            acc = evaluate(full)  # LoFT
        accelerator.print(f"epoch {epoch + 1}: loss {loss.item():.4f} test acc {100 * acc:.2f}%")
    if args.output and accelerator.is_main_process:
        with open(args.output, "w") as f:
            json.dump({"test_acc": acc, "epochs": args.epochs, "world": accelerator.num_processes}, f)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
