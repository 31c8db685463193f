"""The long-tail-aware coordinator: spot training of the drafter on DP ranks whose rollout is done (`spot.py`)."""
from megatron_tlt.coordinator.spot import SpotStats, SpotTrainer

__all__ = ["SpotStats", "SpotTrainer"]
