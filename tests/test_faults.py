"""Issue 16, "nothing hangs, nothing is lost": every fault ends in a defined, tested outcome.

- a non-finite update is rolled back (weights and AdamW state), logged, and repeated ones stop the run;
  `optim.lr` must be finite and > 0 at load;
- the held-out evaluation scores through the RewardPool: a reward that hangs, raises, exits or returns a
  non-finite number scores 0 and is counted, within `reward.timeout_s`;
- a TLT rank whose peer died leaves spot training within a bounded time, and the launcher exits non-zero.
"""
import logging
import math

import pytest
import torch

from megatron_tlt.cli import main as cli_main
from megatron_tlt.config import ModelConfig, load_config
from megatron_tlt.config.loader import ConfigError
from megatron_tlt.config.schema import AlgoConfig, OptimConfig
from megatron_tlt.coordinator.exchange import exchange_for_update
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import init_parallel
from megatron_tlt.rl.sample import Sample
from megatron_tlt.step.stages import assign_advantages
from megatron_tlt.trainer.policy import PolicyTrainer, TrainingDiverged
from megatron_tlt.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(vocab_size=96, make_vocab_size_divisible_by=32, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_attention_heads=4, num_kv_heads=2)


def _samples(ps, n: int = 8) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        resp = torch.randint(0, 96, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        out.append(Sample([1, 2, 3], resp, [-4.0] * len(resp), reward=float(i % 2), group=i // 4))
    return assign_advantages(out, AlgoConfig(), 16, ps)[0]


def _run_cfg(tmp_path, *extra):
    return load_config(None, [
        f"run.dir={tmp_path / 'run'}", "run.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4",
        "data.num_examples=16", "data.eval_examples=2", "reward.num_workers=0", "run.tensorboard=false",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "rollout.temperature=1.0", *extra,
    ])


# ---- item 5: a non-finite update -------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf", "0", "-1e-3"])
def test_lr_must_be_finite_and_positive_at_load(lr):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"optim.lr={lr}"])
    assert "optim.lr=" in str(e.value) and "supported: a finite number > 0" in str(e.value)


def test_max_bad_updates_is_checked_at_load():
    with pytest.raises(ConfigError, match="optim.max_bad_updates=0 is not supported"):
        load_config(None, ["optim.max_bad_updates=0"])


def test_non_finite_weights_roll_the_update_back_and_repeats_stop(caplog):
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    optim = OptimConfig(lr=1e-3, max_bad_updates=2)
    trainer = PolicyTrainer(model, optim, AlgoConfig(), ps, total_steps=10)
    batch = exchange_for_update(_samples(ps), 64, ps)
    metrics, _ = trainer.step(batch.samples, batch.micro_batches, max_response_len=16)  # a good step: Adam state exists
    assert metrics["skipped_update"] == 0 and trainer.version == 1
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    for group in trainer.optimizer.param_groups:  # lr inf (what the config now refuses): finite loss and gradient, NaN weights
        group["lr"] = math.inf
    with caplog.at_level(logging.WARNING):
        metrics, _ = trainer.step(batch.samples, batch.micro_batches, max_response_len=16)
    assert metrics["skipped_update"] == 1.0 and metrics["rolled_back_update"] == 1.0
    assert "non-finite weights after the update" in caplog.text and "rolled back" in caplog.text
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters()), "the weights were not rolled back"
    for p, s in trainer.optimizer.state.items():
        assert all(torch.equal(state[id(p)][k], v) for k, v in s.items()), "the AdamW state was not rolled back"
    assert trainer.version == 1 and trainer.bad_updates == 1
    with pytest.raises(TrainingDiverged, match=r"2 consecutive policy updates skipped or rolled back \(optim.max_bad_updates=2\)"):
        trainer.step(batch.samples, batch.micro_batches, max_response_len=16)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_a_good_update_resets_the_count():
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    trainer = PolicyTrainer(model, OptimConfig(lr=1e-3, max_bad_updates=2), AlgoConfig(), ps, total_steps=10)
    batch = exchange_for_update(_samples(ps), 64, ps)
    for lr in (math.inf, 1e-3, 1e38, 1e-3):  # bad (NaN weights), good, bad (torch: overflow), good: never 2 in a row
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        trainer.step(batch.samples, batch.micro_batches, max_response_len=16)
    assert trainer.version == 2 and trainer.bad_updates == 0


def test_a_diverging_run_stops_non_zero_without_saving_nan(tmp_path, capsys):
    # lr 1e38 passes the load check (finite, > 0) but overflows fp32 in the first update.
    overrides = [f"run.dir={tmp_path / 'run'}", "run.steps=4", "run.save_every=1", "optim.lr=1e38", "optim.max_bad_updates=2",
                 "run.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4", "data.num_examples=16",
                 "data.eval_examples=2", "reward.num_workers=0", "run.tensorboard=false", "model.hidden_size=32",
                 "model.intermediate_size=64", "model.num_layers=1", "rollout.temperature=1.0"]
    assert cli_main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert "megatron-tlt train: error: 2 consecutive policy updates skipped or rolled back" in err
    assert "the update overflowed" in err
    # step 0 was rolled back (its checkpoint holds the finite pre-step weights); step 1 stopped the run unsaved
    saved = sorted(p.name for p in (tmp_path / "run").glob("checkpoints/step_*"))
    assert saved == ["step_1"]
    from megatron_tlt.checkpoint.dcp import load_full_state_dict_from_checkpoint

    weights = load_full_state_dict_from_checkpoint(tmp_path / "run" / "checkpoints" / "step_1")
    assert weights and all(torch.isfinite(w).all() for w in weights.values()), "a checkpoint holds non-finite weights"


# ---- item 3: the held-out evaluation scores through the reward pool ---------------------------------


class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _FixedEngine:
    """Answers every prompt with the same tokens: the evaluation's reward path without a model."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    def generate(self, prompts, params):
        return [[_Completion(self.token_ids)] for _ in prompts]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_tlt.data.tokenizer import build_test_tokenizer, load_tokenizer

    return load_tokenizer(build_test_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("fn, counted, message", [
    ("sleeps", "num_timeouts", "timed out after 0.5s"),
    ("raises", "num_errors", "ValueError: this reward always raises"),
    ("exits", "num_errors", "reward worker died (exit code 7)"),
    ("returns_inf", "num_errors", "reward function returned inf, not a finite number"),
])
def test_evaluation_scores_through_the_pool(tokenizer, caplog, fn, counted, message):
    from megatron_tlt.data.datasets import PromptDataset
    from megatron_tlt.rl.rewards import RewardPool, build_reward_fn
    from megatron_tlt.step.evaluate import evaluate

    ps = init_parallel()
    ds = PromptDataset.from_task("arithmetic", 4, 0, tokenizer, max_prompt_tokens=256)
    engine = _FixedEngine(tokenizer.encode("42", add_special_tokens=False))
    with RewardPool(build_reward_fn([{"name": f"fault_rewards:{fn}"}]), num_workers=2, timeout_s=0.5) as pool:
        with caplog.at_level(logging.WARNING):
            import time

            t0 = time.monotonic()
            accuracy = evaluate(engine, ds, pool, tokenizer, 4, ps)
            elapsed = time.monotonic() - t0
        assert accuracy == 0.0  # a failed call is not a correct answer (inf included)
        assert getattr(pool.stats, counted) == 4 and pool.stats.num_calls == 4
        assert message in caplog.text and "4 of 4 calls failed and score 0" in caplog.text
        assert elapsed < 10.0, f"evaluation took {elapsed:.1f} s"  # 2 rounds of the 0.5 s timeout + worker start-up
    with RewardPool(build_reward_fn([{"name": "fault_rewards:correct"}]), num_workers=1, timeout_s=5.0) as pool:
        assert evaluate(engine, ds, pool, tokenizer, 4, ps) == 1.0


def test_a_hanging_reward_does_not_hang_the_run(tmp_path):
    import time

    t0 = time.monotonic()
    run_dir = train(_run_cfg(tmp_path, "run.steps=1", "reward.fns=[{name: 'fault_rewards:sleeps'}]", "reward.num_workers=2",
                             "reward.timeout_s=0.5", "optim.lr=1e-3"))
    elapsed = time.monotonic() - t0
    # evaluation before (2 prompts) and after (2) and one step's 4 rollouts, each call cut at 0.5 s by 2 workers
    assert (run_dir / "checkpoints" / "step_1").is_dir()
    assert elapsed < 60.0, f"the run took {elapsed:.1f} s"
