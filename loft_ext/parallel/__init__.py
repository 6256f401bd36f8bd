"""Distributed LoFT: the process grid, counted collectives, sync strategies."""
