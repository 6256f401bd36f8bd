#!/usr/bin/env python
"""LoFT for a timm CNN: pretrain (S filter workers, L local steps per round) -> draw tickets at one or
several pruning ratios -> fine-tune each with its masks enforced -> evaluate -> comparison table.

Default (no flags): resnet18 on scikit-learn's bundled digits, S=2, one structured ticket at r=0.5.
  python recipes/loft_timm.py                      one process, the S workers simulated
  torchrun --nproc_per_node 2 recipes/loft_timm.py one process per worker (gloo on CPU)
  accelerate launch recipes/loft_timm.py           one process per GPU (NCCL); on CPU:
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/loft_timm.py
Every flag is generated from loft_ext's hparam dataclasses; see docs/usage.md.

Exit status: 0 done; 2 bad input (one "error:" line, nothing trained or overwritten); 1 the run failed
(non-finite values, a lost rank: the last checkpoint is kept; an unexpected error: one line naming
the file under <output_dir>/errors/ that holds its traceback); 128+N preempted by signal N (143 for
SIGTERM, 130 for SIGINT) after writing a checkpoint: rerun with --resume latest (docs/reliability.md).
"""
import argparse
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loft_ext.engine.pipeline import ALL_HPARAMS, run_pipeline  # noqa: E402
from loft_ext.errors import report_failure  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in ALL_HPARAMS:
        cls.add_args(parser)
    args = parser.parse_args(argv)
    try:
        run_pipeline(*(cls.from_args(args) for cls in ALL_HPARAMS))
    except Exception as exc:  # every failure ends as one line (and a traceback file when unexpected)
        return report_failure(exc, getattr(args, "output_dir", None))
    finally:
        # gloo can abort at interpreter exit if the group outlives the models: tear it down here
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
