"""Run checkpoints: everything a bit-exact resume needs, saved every `run.save_every` RL steps.

    state = RunState(model, trainer, sampler, drafter, tlt.drafter_trainer)   # drafter parts may be None
    state.save(run_dir / "checkpoints" / "step_10", step=10, files=tokenizer_files)
    path = latest_checkpoint(run_dir)          # the newest complete step_N, or None
    steps_done = state.load(path)

Held: the policy, its AdamW state (resharded like the model), the lr schedule, the prompt sampler's
position, torch's RNG state, and under SD the drafter (its AdamW state and step count under TLT).
Training 4 steps equals training 2, resuming and training 2 more, bit for bit (tests/test_train.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_tlt.checkpoint.dcp import (
    init_adam_state, is_tlt_checkpoint, load_checkpoint, module_state, optimizer_state, save_checkpoint,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The complete `run_dir/checkpoints/step_N` with the largest N, or None."""
    ckpts = [p for p in (run_dir / "checkpoints").glob("step_*") if _STEP_DIR.match(p.name) and is_tlt_checkpoint(p)]
    return max(ckpts, key=lambda p: int(p.name.split("_")[1]), default=None)


@dataclass
class RunState:
    model: Any  # the policy
    trainer: Any  # trainer.policy.PolicyTrainer
    sampler: Any  # data.datasets.PromptSampler
    drafter: Any = None  # under speculative rollouts
    drafter_trainer: Any = None  # under TLT (online drafter training)

    def _states(self) -> dict:
        """Views of everything a resume restores (loaded in place by DCP). Optimizer state that does not exist
        yet is created as AdamW would on its first step (zeros), so save and load see the same keys."""
        init_adam_state(self.trainer.optimizer)
        states = {
            "optimizer": optimizer_state(self.model, self.trainer.optimizer),
            "trainer": {**self.trainer.state_dict(), "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state()},
        }
        if self.drafter is not None:
            states["drafter"] = module_state(self.drafter, self.model.tp_group)
        if self.drafter_trainer is not None:
            init_adam_state(self.drafter_trainer.optimizer)
            states["drafter_optimizer"] = optimizer_state(self.drafter, self.drafter_trainer.optimizer, self.model.tp_group)
            states["trainer"]["drafter_steps"] = self.drafter_trainer.steps
        return states

    def save(self, path: Path, step: int, files: dict[str, Path]) -> Path:
        """The state after `step` completed RL steps, with `files` (e.g. the tokenizer's) copied in."""
        return save_checkpoint(path, self.model, self.model.cfg, states=self._states(), meta={"step": step}, files=files)

    def load(self, path: Path) -> int:
        """Restore everything in place; returns the completed RL steps."""
        states = self._states()
        meta = load_checkpoint(path, self.model, states=states)
        trainer_state = states["trainer"]
        self.trainer.load_state_dict(trainer_state)
        self.sampler.load_state_dict(trainer_state["sampler"])
        torch.set_rng_state(trainer_state["torch_rng"])
        if self.drafter_trainer is not None:
            self.drafter_trainer.steps = int(trainer_state["drafter_steps"])
        return int(meta["step"])
