"""The stages of a training step: rollout -> verify -> segment -> redistribute -> update (rredcot/trainer.py)."""
