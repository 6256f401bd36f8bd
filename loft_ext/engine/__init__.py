"""LoFT engine: the full model, workers' sub-networks, rounds, and the training loop."""
