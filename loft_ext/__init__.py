"""loft_ext: LoFT (Lottery ticket through Filter-wise Training) for timm CNNs.

Modules (imports flow one way): ``engine`` (rounds, loop, runner) -> ``partition`` (channel analysis,
plans, sub-networks) -> ``data``, ``models``, ``hparams`` (utilities).
"""
__version__ = "0.1.0"
