"""Which DP rank does what: prompt assignment and rollout names (`assignment`), samples across ranks for the
update (`exchange`), and spot training of the drafter on ranks whose rollout is done (`spot`)."""
from megatron_tlt.coordinator.spot import SpotStats, SpotTrainer

__all__ = ["SpotStats", "SpotTrainer"]
