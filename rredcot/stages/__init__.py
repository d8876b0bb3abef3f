"""The pipeline stages: rollout -> verify -> segment -> redistribute -> update."""
