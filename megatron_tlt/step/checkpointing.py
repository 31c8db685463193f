"""Run checkpoints: everything a bit-exact resume needs, saved every `run.save_every` RL steps.

    resume_from = open_run_dir(run_dir, cfg.run.resume, cfg.run.overwrite, cfg.run.steps)   # every rank; None = fresh
    state = RunState(model, trainer, sampler, drafter, tlt.drafter_trainer)   # drafter parts may be None
    state.save(run_dir / "checkpoints" / "step_10", step=10, files=tokenizer_files)
    steps_done = state.load(resume_from, verify=False)   # open_run_dir verified it

Held: the policy, its AdamW state (resharded like the model; under optim.distributed each DP rank saves and
loads the shard it owns, so a run resumes at another DP size, sharded or not), the lr schedule, the prompt
sampler's position, torch's RNG state, the scheduler's length predictions, and under SD the drafter (its AdamW state and step count under TLT).
Training 4 steps equals training 2, resuming and training 2 more, bit for bit (tests/test_train.py; at DP=2
with optim.distributed, tests/test_distributed_optimizer.py).

The run directory (`open_run_dir`, rank 0 decides, every rank gets the answer):
- run.resume=auto (default): continue from the newest checkpoint that verifies, else start fresh -- but a
  fresh start refuses a directory that holds another run's checkpoints or metrics (UserError naming it and the
  options), and so does a checkpoint past run.steps. true: continue, an error if nothing verifies. false:
  start fresh, refusing such a directory. run.overwrite=true: start fresh, deleting the old run's checkpoints,
  metrics and TensorBoard events first.
- "verifies": a COMPLETE marker of our format, every file matching the sha256 manifest written at save, a
  model_config.yaml that parses. Newer checkpoints that fail are moved to `checkpoints/skipped/` (never
  deleted; a later save of that step is then not refused) and logged with the reason, so a resume never
  trips over the same broken directory twice.
- `step_N.tmp-*` left by interrupted saves are deleted -- unless step_N is absent and the temporary is a
  complete save (a crash inside the final swap), which is renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_tlt.checkpoint.dcp import (
    FORMAT, META_FILE, init_adam_state, is_tlt_checkpoint, load_checkpoint, module_state, optimizer_state,
    read_model_config, save_checkpoint,
)
from megatron_tlt.checkpoint.publish import TMP_INFIX, broadcast_object, rank, read_format, stale_temporaries, verify_files
from megatron_tlt.errors import CheckpointError, UserError
from megatron_tlt.metrics import LENGTHS_FILE, METRICS_FILE

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
CHECKPOINTS = "checkpoints"
SKIPPED = "skipped"  # checkpoints/skipped/: step dirs that failed verification, moved aside
_RUN_OUTPUTS = (METRICS_FILE, LENGTHS_FILE, "tensorboard", CHECKPOINTS)  # what run.overwrite deletes


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The complete `run_dir/checkpoints/step_N` with the largest N, or None."""
    ckpts = [p for p in (run_dir / "checkpoints").glob("step_*") if _STEP_DIR.match(p.name) and is_tlt_checkpoint(p)]
    return max(ckpts, key=lambda p: int(p.name.split("_")[1]), default=None)


def _step_dirs(run_dir: Path) -> list[Path]:
    """Every `checkpoints/step_N` directory (complete or not), newest first."""
    found = [p for p in (run_dir / CHECKPOINTS).glob("step_*") if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def verify_run_checkpoint(path: Path) -> int:
    """The completed steps of the run checkpoint `path` if it verifies (COMPLETE of our format, every file
    against its sha256 manifest, model_config.yaml and meta.json readable), else a CheckpointError saying why."""
    if read_format(path) != FORMAT:
        raise CheckpointError(f"{path} has no valid COMPLETE marker (the save was interrupted, or it was copied in part)")
    verify_files(path)
    read_model_config(path)
    try:
        step = int(json.loads((path / META_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path / META_FILE} is missing or holds no step") from None
    if m := _STEP_DIR.match(path.name):
        if int(m.group(1)) != step:
            raise CheckpointError(f"{path} holds the state after step {step}, not {m.group(1)} (renamed or copied in)")
    return step


def _move_aside(path: Path) -> Path:
    dest_dir = path.parent / SKIPPED
    dest_dir.mkdir(exist_ok=True)
    dest, k = dest_dir / path.name, 1
    while dest.exists():
        k += 1
        dest = dest_dir / f"{path.name}-{k}"
    os.rename(path, dest)
    return dest


def clean_temporaries(ckpt_dir: Path) -> None:
    """Delete `*.tmp-*` left by interrupted saves; a complete one whose target is absent (a crash inside the
    final swap) is renamed into place instead (the new copy before the moved-aside old one)."""
    stale = stale_temporaries(ckpt_dir)
    for tmp in sorted(stale, key=lambda q: q.name.endswith("-old")):  # new copies first
        target = tmp.with_name(tmp.name.split(TMP_INFIX)[0])
        if not target.exists() and read_format(tmp) is not None:
            os.rename(tmp, target)
            log.warning("recovered %s from the interrupted save %s", target, tmp.name)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("removed %s, left by an interrupted save", tmp)


def find_resumable(run_dir: Path) -> tuple[Optional[Path], int, list[str]]:
    """(newest verifying checkpoint or None, its step, what was skipped and why). One process: it moves failing
    checkpoints (newer than the one returned) to checkpoints/skipped/ and cleans temporaries."""
    ckpt_dir = run_dir / CHECKPOINTS
    clean_temporaries(ckpt_dir)
    skipped = []
    for path in _step_dirs(run_dir):
        try:
            step = verify_run_checkpoint(path)
        except CheckpointError as e:
            dest = _move_aside(path)
            skipped.append(f"{path.name}: {e}")
            log.warning("skipping checkpoint %s: %s (moved to %s)", path, e, dest)
            continue
        return path, step, skipped
    return None, 0, skipped


def _holds_a_run(run_dir: Path) -> list[str]:
    """What in `run_dir` belongs to a run: its checkpoints and non-empty metrics files."""
    held = [f"checkpoints {', '.join(p.name for p in _step_dirs(run_dir)[:3])}"] if _step_dirs(run_dir) else []
    held += [name for name in (METRICS_FILE, LENGTHS_FILE) if (run_dir / name).is_file() and (run_dir / name).stat().st_size]
    return held


def _decide(run_dir: Path, resume: str, overwrite: bool, steps: int) -> Optional[Path]:
    options = ("set run.resume=true (or auto) to continue it, run.overwrite=true to delete it and start over, "
               "or choose another run.dir")
    if overwrite:
        deleted = [name for name in _RUN_OUTPUTS if (run_dir / name).exists()]
        for name in deleted:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if deleted:
            log.warning("run.overwrite=true: deleted %s of the earlier run in %s", ", ".join(deleted), run_dir)
        return None
    if resume == "false":
        held = _holds_a_run(run_dir)
        if held:
            raise UserError(f"run directory {run_dir} holds another run ({'; '.join(held)}) and run.resume=false; {options}")
        clean_temporaries(run_dir / CHECKPOINTS)
        return None
    path, step, skipped = find_resumable(run_dir)
    why = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    if path is not None:
        if step > steps:
            raise UserError(f"run directory {run_dir} holds a run at step {step}, past run.steps={steps}; set run.steps "
                            f"above {step} to continue it, run.overwrite=true to delete it and start over, or choose another run.dir")
        if skipped:
            log.warning("resuming from %s, the newest checkpoint that verifies%s", path, why)
        return path
    if resume == "true":
        raise CheckpointError(f"run.resume=true but {run_dir / CHECKPOINTS} holds no checkpoint that verifies{why}")
    held = _holds_a_run(run_dir) + ([f"{len(skipped)} checkpoints that do not verify{why}"] if skipped else [])
    if held:
        raise UserError(f"run directory {run_dir} holds another run ({'; '.join(held)}) but no checkpoint to resume from; "
                        "run.overwrite=true deletes it and starts over, or choose another run.dir")
    return None


def open_run_dir(run_dir: Path, resume: str, overwrite: bool, steps: int) -> Optional[Path]:
    """The checkpoint to resume from, or None for a fresh run (see the module docstring). Every rank must call
    it; rank 0 reads and tidies the directory and every rank gets its answer or raises its error."""
    answer = None
    if rank() == 0:
        try:
            path = _decide(Path(run_dir), resume, overwrite, steps)
            answer = ("ok", None if path is None else str(path))
        except UserError as e:
            answer = (type(e).__name__, str(e))
    kind, value = broadcast_object(answer)
    if kind == "ok":
        return None if value is None else Path(value)
    raise (CheckpointError if kind == "CheckpointError" else UserError)(value)


@dataclass
class RunState:
    model: Any  # the policy
    trainer: Any  # trainer.policy.PolicyTrainer
    sampler: Any  # data.datasets.PromptSampler
    drafter: Any = None  # under speculative rollouts
    drafter_trainer: Any = None  # under TLT (online drafter training)
    scheduler: Any = None  # coordinator.assignment.RolloutScheduler (its length predictions)

    def _states(self) -> dict:
        """Views of everything a resume restores (loaded in place by DCP). Optimizer state that does not exist
        yet is created as AdamW would on its first step (zeros), so save and load see the same keys."""
        init_adam_state(self.trainer.optimizer)
        states = {
            "optimizer": optimizer_state(self.model, self.trainer.optimizer),
            "trainer": {**self.trainer.state_dict(), "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state()},
        }
        if self.scheduler is not None:
            states["trainer"]["rollout_scheduler"] = json.dumps(self.scheduler.state_dict())
        if self.drafter is not None:
            states["drafter"] = module_state(self.drafter, self.drafter.tp_group)
        if self.drafter_trainer is not None:
            init_adam_state(self.drafter_trainer.optimizer)
            states["drafter_optimizer"] = optimizer_state(self.drafter, self.drafter_trainer.optimizer, self.drafter.tp_group)
            states["trainer"]["drafter_steps"] = self.drafter_trainer.steps
        return states

    def save(self, path: Path, step: int, files: dict[str, Path]) -> Path:
        """The state after `step` completed RL steps, with `files` (e.g. the tokenizer's) copied in."""
        return save_checkpoint(path, self.model, self.model.cfg, states=self._states(), meta={"step": step}, files=files)

    def load(self, path: Path, verify: bool = True) -> int:
        """Restore everything in place; returns the completed RL steps. `verify=False` skips the checksums
        (when `open_run_dir` just verified `path`)."""
        states = self._states()
        meta = load_checkpoint(path, self.model, states=states, verify=verify)
        trainer_state = states["trainer"]
        self.trainer.load_state_dict(trainer_state)
        self.sampler.load_state_dict(trainer_state["sampler"])
        torch.set_rng_state(trainer_state["torch_rng"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(json.loads(trainer_state["rollout_scheduler"]))
        if self.drafter_trainer is not None:
            self.drafter_trainer.steps = int(trainer_state["drafter_steps"])
        return int(meta["step"])
