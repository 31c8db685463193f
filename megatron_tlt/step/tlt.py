"""TLT in the RL step, behind one object: the drafter's online training on DP ranks whose rollout is done.

`build_drafter_training(cfg, drafter, ps)` returns `OnlineDrafterTraining` when the drafter is trained
during RL (`drafter.online` with speculative rollouts) and `NoDrafterTraining` otherwise, so the driver
calls the same four hooks either way:

    tlt.rollout_done(rollout_id)           # this rank's rollout is done: spot-train until the slowest is too
    metrics = tlt.merge()                  # every rank: identical drafter weights for the next rollout
    if tlt.collect_hidden: ...             # the policy update returns its hidden states for the buffer
                                           # (and the outputs of tlt.feature_layers for an EAGLE-3 drafter)
    tlt.add_update(step, samples, hidden)  # the buffer takes (tokens, hidden) of this rank's update share
    tlt.close()                            # the run ended normally on this rank

With more than one process, online training also starts a `coordinator.spot.PeerWatchdog`: a dead peer
ends every rank within `drafter.peer_timeout_s` (+ 2 heartbeats), with a message and a non-zero exit, and
spot training gives up past `drafter.max_wait_s` after this rank's rollout end.

`tlt.drafter_trainer` (None without online training) is saved with run checkpoints.
"""
from __future__ import annotations


from megatron_tlt.config.schema import Config
from megatron_tlt.coordinator.assignment import RolloutId
from megatron_tlt.parallel.state import ParallelState


class NoDrafterTraining:
    """The drafter (if any) stays as it is during RL."""

    collect_hidden = False
    drafter_trainer = None
    feature_layers = None

    def rollout_done(self, rollout: RolloutId) -> None:
        pass

    def merge(self) -> dict[str, float]:
        return {}

    def add_update(self, step: int, samples, hidden) -> None:
        pass

    def close(self) -> None:
        pass


class OnlineDrafterTraining:
    """TLT: spot training on idle DP ranks (`coordinator.spot.SpotTrainer`) from a buffer that the policy
    update's own forward fills."""

    collect_hidden = True

    def __init__(self, spot, watchdog=None):
        self.spot, self.watchdog = spot, watchdog
        self.feature_layers = spot.trainer.drafter.feature_layers  # the update's forward also returns these (EAGLE-3)

    def hidden_width(self, hidden_size: int) -> int:
        """Width of the update's hidden rows for the buffer: H, + 3H of target features for an EAGLE-3 drafter."""
        return hidden_size * (1 if self.feature_layers is None else 4)

    @property
    def drafter_trainer(self):
        return self.spot.trainer

    def rollout_done(self, rollout: RolloutId) -> None:
        self.spot.spot_train(str(rollout))

    def merge(self) -> dict[str, float]:
        return self.spot.merge()

    def add_update(self, step: int, samples, hidden) -> None:
        self.spot.add_to_buffer(step, samples, hidden)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()


def build_drafter_training(cfg: Config, drafter, ps: ParallelState) -> "NoDrafterTraining | OnlineDrafterTraining":
    if drafter is None or not cfg.drafter.online:
        return NoDrafterTraining()
    from megatron_tlt.coordinator.spot import PeerWatchdog, SpotTrainer
    from megatron_tlt.drafter.data import DrafterBuffer
    from megatron_tlt.drafter.trainer import DrafterTrainer

    trainer = DrafterTrainer(drafter, lr=cfg.drafter.lr, max_tokens_per_micro_batch=cfg.drafter.micro_batch_tokens,
                             ttt_steps=cfg.drafter.ttt_steps, ttt_hidden_weight=cfg.drafter.ttt_hidden_weight)
    spot = SpotTrainer(trainer, DrafterBuffer(int(cfg.drafter.buffer_gb * 2**30)), ps, seed=cfg.run.seed,
                       max_wait_s=cfg.drafter.max_wait_s)
    watchdog = PeerWatchdog(ps.rank, ps.world_size, cfg.drafter.peer_timeout_s).start() if ps.world_size > 1 else None
    return OnlineDrafterTraining(spot, watchdog)
