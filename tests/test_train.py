"""GRPO training end to end: the packed update (DP=2 == DP=1, NaN skip), the driver (metrics, resume
bit-exactness, dynamic sampling refills, bad data rows) and the plots, on a tiny CPU model."""
import json
import logging
from dataclasses import replace

import pytest
import torch
from dist_utils import run_distributed

from megatron_tlt.checkpoint.dcp import load_full_state_dict_from_checkpoint
from megatron_tlt.config import ModelConfig, load_config
from megatron_tlt.config.schema import AlgoConfig, OptimConfig
from megatron_tlt.coordinator.exchange import exchange_for_update
from megatron_tlt.data.datasets import PromptDataset, PromptSampler
from megatron_tlt.data.tokenizer import build_test_tokenizer, load_tokenizer
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel
from megatron_tlt.step.stages import assign_advantages
from megatron_tlt.plot import plot_run
from megatron_tlt.rl.sample import Sample
from megatron_tlt.trainer.policy import PolicyTrainer
from megatron_tlt.train import train

CFG = ModelConfig(vocab_size=96, make_vocab_size_divisible_by=32, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_attention_heads=4, num_kv_heads=2)
REQUIRED_METRICS = {"step", "reward_mean", "response_len_mean", "response_len_p50", "response_len_p90", "response_len_max",
                    "rollout_time_s", "rollout_time_max_s", "reward_time_s", "train_time_s", "step_time_s", "tokens_per_s"}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_samples(ps, seed: int = 0, n: int = 12) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 96, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        resp = torch.randint(0, 96, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
        out.append(Sample(prompt, resp, [-4.0] * len(resp), reward=float(i % 3 == 0), group=i // 4))
    return assign_advantages(out, AlgoConfig(), 16, ps)[0]


def _update(model, ps, samples, micro_batch_tokens=40):
    # Adam's first step is ~lr * sign(grad): a gradient that is ~0 up to summation order would flip the
    # sign of its update between DP layouts. A large eps makes the update a smooth function of the gradient.
    optim = OptimConfig(lr=1e-2, eps=1.0, micro_batch_tokens=micro_batch_tokens)
    trainer = PolicyTrainer(model, optim, AlgoConfig(), ps, total_steps=2)
    batch = exchange_for_update(samples, micro_batch_tokens, ps)  # this rank's share of the global batch
    metrics, _ = trainer.step(batch.samples, batch.micro_batches, max_response_len=16)
    return metrics


def _dp_worker(rank, world_size, init_path, expected_path):
    torch.set_num_threads(1)
    ps = init_parallel()
    assert ps.dp_size == 2
    model = Policy(CFG, ps.tp_group, init_weights=False)
    load_full_state_dict(model, torch.load(init_path))
    metrics = _update(model, ps, [s for s in make_samples(ps) if s.group % 2 == rank])  # whole groups per rank
    expected = torch.load(expected_path)
    for name, p in gather_full_state_dict(model).items():
        torch.testing.assert_close(p, expected["weights"][name], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
    assert abs(metrics["loss"] - expected["loss"]) < 1e-6 and abs(metrics["grad_norm"] - expected["grad_norm"]) < 1e-5


def test_dp2_update_equals_dp1(tmp_path):
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    torch.save(gather_full_state_dict(model), tmp_path / "init.pt")
    metrics = _update(model, ps, make_samples(ps), micro_batch_tokens=40)
    assert metrics["skipped_update"] == 0 and metrics["grad_norm"] > 0
    torch.save({"weights": gather_full_state_dict(model), "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]},
               tmp_path / "expected.pt")
    init = torch.load(tmp_path / "init.pt")
    assert any(not torch.equal(init[n], p) for n, p in gather_full_state_dict(model).items()), "the update changed nothing"
    destroy_parallel()
    run_distributed(_dp_worker, world_size=2, args=(str(tmp_path / "init.pt"), str(tmp_path / "expected.pt")))


def test_nan_loss_skips_the_update(caplog):
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    samples = make_samples(ps)
    samples[0] = replace(samples[0], advantage=float("nan"))
    with caplog.at_level(logging.WARNING):
        metrics = _update(model, ps, samples)
    assert metrics["skipped_update"] == 1.0
    assert "update skipped" in caplog.text
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_overlong_mask_and_penalty():
    samples = [Sample([1], [2] * 16, [0.0] * 16, reward=1.0, group=0, finish_reason="length"),
               Sample([1], [2] * 4, [0.0] * 4, reward=1.0, group=0, finish_reason="stop")]
    samples, _ = assign_advantages(samples, AlgoConfig(overlong="mask"), 16, init_parallel())
    assert [s.trained for s in samples] == [False, True]
    samples = [Sample([1], [2] * 16, [0.0] * 16, reward=1.0, group=0), Sample([1], [2] * 4, [0.0] * 4, reward=1.0, group=0)]
    samples, _ = assign_advantages(samples, AlgoConfig(overlong="penalty", overlong_buffer=8, overlong_penalty=1.0), 16, init_parallel())
    assert samples[0].reward == pytest.approx(0.0) and samples[1].reward == pytest.approx(1.0)
    assert samples[0].advantage < 0 < samples[1].advantage


def _cfg(tmp_path, name, *extra):
    return load_config(None, [
        f"run.dir={tmp_path / name}", "run.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=8",
        "data.num_examples=32", "data.eval_examples=4", "reward.num_workers=0", "run.tensorboard=false",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "optim.lr=1e-3",
        "rollout.temperature=1.0", *extra,
    ])


@pytest.mark.parametrize("spec,arch", [("off", "eagle3"), ("chain", "eagle3"), ("chain", "eagle")])
def test_metrics_plots_and_resume_is_bit_exact(tmp_path, spec, arch):
    """With SD: TLT end to end (the buffer filled by the update's forward, merge, the drafter resumed bit-exact)
    with each drafter head."""
    extra = [f"rollout.spec={spec}", f"drafter.arch={arch}"]
    straight = train(_cfg(tmp_path, "straight", "run.steps=4", *extra))
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert REQUIRED_METRICS <= set(rows[0])
    assert ("spec_row_steps" in rows[0]) == (spec != "off")
    if spec != "off":
        assert sum(r["spec_row_steps"] for r in rows) > 0 and "accept_len" in rows[0]
    assert "eval_accuracy" in rows[-1]
    assert {p.name for p in plot_run(straight)} == {"reward.png", "lengths.png", "time.png", "timeline.png"}

    train(_cfg(tmp_path, "resumed", "run.steps=4", "run.save_every=2", *extra))  # writes step_2 and step_4
    resumed_dir = tmp_path / "resumed"
    import shutil

    shutil.rmtree(resumed_dir / "checkpoints" / "step_4")
    destroy_parallel()
    train(_cfg(tmp_path, "resumed", "run.steps=4", "run.save_every=2", "run.resume=true", *extra))
    for state in ["model"] + (["drafter"] if spec != "off" else []):
        a = load_full_state_dict_from_checkpoint(straight / "checkpoints" / "step_4", state)
        b = load_full_state_dict_from_checkpoint(resumed_dir / "checkpoints" / "step_4", state)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{state}: 4 steps != 2 + resume + 2"
    resumed_rows = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_rows] == [0, 1, 2, 3]


def test_dynamic_sampling_refills(tmp_path):
    # Reward = response length parity: groups of 2 samples are often all-equal and get dropped.
    run = train(_cfg(tmp_path, "dyn", "run.steps=2", "algo.dynamic_sampling=true", "algo.max_refill_rounds=3",
                     "reward.fns=[{name: 'reward_fns_for_tests:length_parity', weight: 1.0}]"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["prompts_drawn"] > 4 for r in rows), "no refill happened"
    assert all(r["num_samples"] % 2 == 0 for r in rows)


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
    tok = load_tokenizer(build_test_tokenizer(tmp_path / "tok"))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([
        json.dumps({"question": "1+1=?", "answer": "2"}),
        json.dumps({"question": "no answer"}),
        "{not json",
        json.dumps({"question": "9+9=? " * 200, "answer": "18"}),
        json.dumps({"question": "2+2=?", "answer": 4}),
    ]))
    with caplog.at_level(logging.WARNING):
        ds = PromptDataset.from_file(path, tok, prompt_key="question", answer_key="answer", max_prompt_tokens=64)
    assert [e.answer for e in ds.examples] == ["2", "4"]
    assert "skipped 1 rows" in caplog.text and "over 64 tokens" in caplog.text and "not a JSON object" in caplog.text


def test_sampler_is_deterministic_and_resumable():
    a = PromptSampler(10, seed=3)
    first = a.take(7) + a.take(7)  # crosses an epoch
    assert sorted(first[:10]) == list(range(10))
    b = PromptSampler(10, seed=3)
    b.take(7)
    state = b.state_dict()
    c = PromptSampler(10, seed=3)
    c.load_state_dict(state)
    assert c.take(7) == first[7:]
