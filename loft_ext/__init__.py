"""loft_ext: LoFT (LOttery ticket through Filter-wise Training) for timm CNNs, as a library.

Adopt it in your own Accelerate loop with the :class:`LoFT` helper (docs/library.md); the recipe
``recipes/loft_timm.py`` is built on the same names. Modules (imports flow one way):
``engine`` (helper, loop, pretraining, pipeline) -> ``partition`` / ``parallel`` / ``plugins`` /
``tickets`` -> utilities (``errors``, ``hparams``, ``data``, ``models``, ``evaluation``, ``tracking``).
"""
from .engine.checkpointing import load_model_shards, save_model_shards
from .engine.helper import LoFT, LoFTConfig, RunState
from .engine.loop import fit, local_step, lr_at
from .errors import ConfigError, LoftError, PluginError, Preempted, TrainingFailure, report_failure
from .evaluation import evaluate, recalibrate_bn
from .models import create_model
from .partition.check import check_plan
from .partition.plan import PRESETS, PartitionPlan, make_plan
from .plugins.base import EVENTS, LoftRun, Plugin
from .plugins.distance import DistanceStop, FilterDistance
from .plugins.earlybird import EarlyBird
from .plugins.guard import NonFiniteGuard
from .plugins.preemption import Preemption
from .plugins.progress import Progress
from .plugins.registry import available_plugins, create_plugin, register_plugin
from .plugins.snapshots import SaveWeights
from .tickets.export import compact_model
from .tickets.masks import load_masks, save_masks
from .tickets.plugins import MaskEnforcement, Ticket, TicketDrawer, draw_ticket

__version__ = "0.2.0"

__all__ = [
    "LoFT", "LoFTConfig", "RunState", "fit", "local_step", "lr_at",
    "LoftError", "ConfigError", "TrainingFailure", "PluginError", "Preempted", "report_failure",
    "evaluate", "recalibrate_bn", "create_model", "make_plan", "check_plan", "PartitionPlan", "PRESETS",
    "Plugin", "LoftRun", "EVENTS", "register_plugin", "create_plugin", "available_plugins",
    "Progress", "FilterDistance", "DistanceStop", "EarlyBird", "NonFiniteGuard", "Preemption", "SaveWeights",
    "TicketDrawer", "MaskEnforcement", "draw_ticket", "Ticket", "compact_model", "save_masks", "load_masks",
    "save_model_shards", "load_model_shards", "__version__",
]
