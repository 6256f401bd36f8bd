"""Tickets: pruning masks, mask-enforced fine-tuning, compact export."""
