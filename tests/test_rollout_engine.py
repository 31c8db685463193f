"""Rollout engine with plain decoding: equal to naive full forwards, exact sampling distribution and logprobs,
shared prefill, queueing under a tiny KV budget, a shrinking batch, stop/length/too-long outcomes, TP=2 == TP=1,
and the `megatron-tlt generate` command."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist
import engine_utils
from dist_utils import run_distributed
from engine_utils import record_forward_shapes, tokens_of

from megatron_tlt.cli import main as cli_main
from megatron_tlt.config.schema import ModelConfig, ParallelConfig
from megatron_tlt.models.hf import hf_config_from_model_config, tlt_to_hf_state_dict, write_hf_dir
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel.state import destroy_parallel, init_parallel
from megatron_tlt.rollout import RolloutEngine, SamplingParams, StepOutput, target_logprobs

CFG = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
    max_position_embeddings=64, init_std=0.2,
)
WINDOW = 40  # engine max_seq_len in most tests
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def model():
    # Tiny matmuls: one thread is much faster than several fighting over shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ps = init_parallel()
    torch.manual_seed(0)
    yield Policy(CFG, tp_group=ps.tp_group).eval()
    destroy_parallel()
    torch.set_num_threads(threads)


def make_engine(model, num_slots=16, max_seq_len=WINDOW, **kw) -> RolloutEngine:
    return engine_utils.make_engine(model, num_slots, max_seq_len, **kw)


@torch.no_grad()
def dense_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], torch.Tensor]:
    """Naive reference: a full dense forward per token + argmax -> (tokens, final hidden [L, H] that produced each)."""
    seq, hidden = list(prompt), []
    for _ in range(max_new):
        h = model.hidden_states(torch.tensor([seq]))
        logits = model.compute_logits(h)
        seq.append(int(logits[0, -1].argmax()))
        hidden.append(h[0, -1])
    return seq[len(prompt):], torch.stack(hidden)


def truncate_at_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1]
    return tokens


# ---- sampling ----
def test_target_logprobs_match_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])

    def renormalised(values: dict[int, float]) -> list[float]:
        """log-probs over 5 tokens, restricted to `values` (token -> scaled logit)."""
        lse = math.log(sum(math.exp(v) for v in values.values()))
        return [values[i] - lse if i in values else NEG_INF for i in range(5)]

    x = [2.0, 1.0, 0.5, 0.0, -1.0]
    cases = [
        (SamplingParams(temperature=0.5), renormalised({i: v / 0.5 for i, v in enumerate(x)})),
        (SamplingParams(top_k=2), renormalised({0: 2.0, 1: 1.0})),
        # probs 0.563, 0.207, 0.126, 0.076, 0.028: mass before tokens 1, 2 is 0.563, 0.770
        (SamplingParams(top_p=0.7), renormalised({0: 2.0, 1: 1.0})),
        (SamplingParams(top_p=0.8), renormalised({0: 2.0, 1: 1.0, 2: 0.5})),
        (SamplingParams(top_p=0.5), renormalised({0: 2.0})),
        # T=2 -> [1, .5, .25, 0, -.5]; top-3 -> probs .481, .292, .227; top_p=0.6 keeps 2 of them
        (SamplingParams(temperature=2.0, top_k=3, top_p=0.6), renormalised({0: 1.0, 1: 0.5})),
        (SamplingParams(temperature=0.0, top_k=3), [0.0, NEG_INF, NEG_INF, NEG_INF, NEG_INF]),
    ]
    for params, expected in cases:
        got = target_logprobs(logits, params)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.tensor([expected]), rtol=1e-6, atol=1e-6, msg=lambda m: f"{params}: {m}")
    # greedy on ties takes the first argmax; rows are independent
    got = target_logprobs(torch.tensor([[1.0, 3.0, 3.0], [5.0, 0.0, 0.0]]), SamplingParams(temperature=0))
    assert got.tolist() == [[NEG_INF, 0.0, NEG_INF], [0.0, NEG_INF, NEG_INF]]


@pytest.mark.parametrize(
    "field,value,message",
    [("temperature", -0.1, "temperature"), ("temperature", float("nan"), "temperature"), ("top_p", 0.0, "top_p"),
     ("top_p", 1.5, "top_p"), ("top_k", -1, "top_k"), ("max_new_tokens", 0, "max_new_tokens"), ("n", 0, "n "),
     ("stop_token_ids", (-1,), "stop_token_ids")],
)
def test_sampling_params_validate(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value}).validate()


# ---- engine vs naive full forwards ----
def test_greedy_matches_naive_dense_loop(model):
    prompts = [[7], [3, 9, 27, 81, 15], list(range(10, 22)), list(range(30, 60))]
    engine = make_engine(model, return_hidden=True)
    results = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, (completion,) in zip(prompts, results):
        max_new = min(12, WINDOW - len(prompt))  # the 30-token prompt hits the context window
        tokens, hidden = dense_greedy(model, prompt, max_new)
        assert completion.token_ids == tokens
        assert completion.finish_reason == "length"
        assert completion.logprobs == [0.0] * max_new
        torch.testing.assert_close(completion.hidden_states, hidden, rtol=1e-4, atol=1e-5)
        assert completion.stats["response_tokens"] == max_new and completion.stats["prompt_tokens"] == len(prompt)


@torch.no_grad()
def test_logprobs_equal_target_distribution_of_full_forward(model):
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.9, max_new_tokens=10, n=2, seed=11)
    prompts = [[5, 6, 7], list(range(40, 52))]
    results = make_engine(model).generate(prompts, params)
    for prompt, samples in zip(prompts, results):
        for c in samples:
            logits = model(torch.tensor([prompt + c.token_ids]))[0]  # [S, V]
            positions = torch.arange(len(c.token_ids)) + len(prompt) - 1
            expected = target_logprobs(logits[positions], params).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.isfinite(expected).all()
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=1e-4, atol=1e-4)


# ---- shared prefill, seeds ----
def test_n_samples_share_one_prefill_and_differ(model, monkeypatch):
    prompts = [list(range(1, 7)), list(range(20, 29))]
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=5)
    engine = make_engine(model)
    shapes = record_forward_shapes(model, monkeypatch)
    results = engine.generate(prompts, params)
    # one padded prefill call for both prompts (all tokens but the last), then 8 decode steps over 6 rows
    assert shapes == [(2, 8)] + [(6, 1)] * 8
    assert engine.stats.prefill_calls == 1
    for samples in results:
        assert [c.stats["prefill_shared"] for c in samples] == [False, True, True]
        token_lists = [c.token_ids for c in samples]
        assert len({tuple(t) for t in token_lists}) == 3, token_lists
    assert tokens_of(engine.generate(prompts, params)) == tokens_of(results)
    assert tokens_of(engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=6))) != tokens_of(results)


def test_samples_do_not_depend_on_batch_composition(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=2)
    engine = make_engine(model)
    alone = engine.generate([[4, 8, 15]], params)
    batched = engine.generate([[4, 8, 15], [16, 23, 42, 50, 51], [1]], params)
    assert tokens_of(alone)[0] == tokens_of(batched)[0]
    # seed_ids: the same prompt at another position (another DP rank's share) draws the same samples
    moved = engine.generate([[16, 23, 42, 50, 51], [4, 8, 15]], params, seed_ids=[1, 0])
    assert tokens_of(moved) == tokens_of(batched)[:2][::-1]
    assert tokens_of(engine.generate([[4, 8, 15]], params, seed_ids=[7]))[0] != tokens_of(alone)[0]
    with pytest.raises(ValueError, match="2 seed_ids for 1 prompts"):
        engine.generate([[4, 8, 15]], params, seed_ids=[0, 1])


# ---- queueing and batch shrinking ----
def test_queue_under_tiny_cache_budget(model):
    prompts = [[i + 1] * (i + 2) for i in range(5)]  # 5 prompts of lengths 2..6
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=3)
    tiny = make_engine(model, num_slots=2)
    assert tiny.num_slots == 2
    results = tiny.generate(prompts, params)
    s = tiny.stats
    assert max(s.decode_batch_sizes) == 2 and s.queued_at_step[0] == 8
    drained = [b for b, queued in zip(s.decode_batch_sizes, s.queued_at_step) if queued == 0]
    assert drained == sorted(drained, reverse=True)
    assert s.prefill_calls == 5  # every prompt's two samples enter together and share one prefill
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for samples in results for c in samples)
    # queueing changes neither what is sampled nor its order
    assert tokens_of(results) == tokens_of(make_engine(model).generate(prompts, params))


def test_batch_shrinks_as_rows_finish(model, monkeypatch):
    prompts = [list(range(1, 1 + n)) for n in (18, 2, 14, 6, 10)]  # limits 6, 22, 10, 18, 14 in a window of 24
    engine = make_engine(model, max_seq_len=24)
    shapes = record_forward_shapes(model, monkeypatch)
    results = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=100))
    sizes = engine.stats.decode_batch_sizes
    assert sizes == [5] * 6 + [4] * 4 + [3] * 4 + [2] * 4 + [1] * 4
    assert [b for b, s in shapes if s == 1] == sizes  # compute follows the live rows
    assert [len(samples[0].token_ids) for samples in results] == [6, 22, 10, 18, 14]


# ---- stop conditions and bad input ----
def test_stop_tokens_lengths_and_too_long_prompts(model):
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8], list(range(WINDOW)), list(range(1, WINDOW)), [9, 9]]
    engine = make_engine(model)
    free = [samples[0] for samples in tokens_of(engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10)))]
    # stop on the first token of prompt 0's response that did not occur before it
    j = next((j for j in range(1, 10) if free[0][j] not in free[0][:j]), 0)
    stop = {free[0][j]}
    results = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=tuple(stop)))
    assert results[0][0].token_ids == free[0][: j + 1] and results[0][0].finish_reason == "stop"
    for i in (1, 4):
        expected = truncate_at_stop(free[i], stop)
        assert results[i][0].token_ids == expected
        assert results[i][0].finish_reason == ("stop" if expected[-1] in stop else "length")
    too_long = results[2][0]
    assert (too_long.token_ids, too_long.logprobs, too_long.finish_reason) == ([], [], "prompt_too_long")
    assert len(results[3][0].token_ids) == 1  # room for exactly one token
    one = engine.generate([[5, 6]], SamplingParams(temperature=0.5, max_new_tokens=1))[0][0]
    assert len(one.token_ids) == 1 and one.finish_reason == "length"


def test_bad_input_raises_before_any_work(model, monkeypatch):
    engine = make_engine(model)
    shapes = record_forward_shapes(model, monkeypatch)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, CFG.vocab_size]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1, 2]], SamplingParams(top_p=0))
    assert shapes == []
    with pytest.raises(ValueError, match="context window"):
        RolloutEngine(model, max_seq_len=CFG.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="below one slot"):
        RolloutEngine(model, cache_budget_bytes=1000)


def test_multi_token_steps_commit_like_plain_steps(model, monkeypatch):
    """The seam speculative decoding plugs into: a step that returns T = 2 tokens per row (here two plain
    steps) must give the same outputs, cut at stop tokens and length limits mid-step."""
    prompts = [[3, 1, 4, 1, 5], [7], list(range(10, 40))]  # the last has room for 10 tokens only
    engine = make_engine(model, return_hidden=True)
    params = SamplingParams(temperature=0, max_new_tokens=7)
    reference = engine.generate(prompts, params)
    stop = (reference[0][0].token_ids[2],)

    def two_plain_steps(rows, params):
        first = engine.plain_step(rows, params)
        advanced = dataclasses.replace(
            rows, lengths=rows.lengths + 1, last_tokens=first.tokens[:, 0], host_lengths=[n + 1 for n in rows.host_lengths]
        )
        second = engine.plain_step(advanced, params)
        return StepOutput(
            tokens=torch.cat([first.tokens, second.tokens], dim=1),
            logprobs=torch.cat([first.logprobs, second.logprobs], dim=1),
            hidden=torch.cat([first.hidden, second.hidden], dim=1),
            num_new=torch.full_like(first.num_new, 2),
        )

    for stop_ids in [(), stop]:
        params = SamplingParams(temperature=0, max_new_tokens=7, stop_token_ids=stop_ids)
        expected = engine.generate(prompts, params)
        monkeypatch.setattr(engine, "step", two_plain_steps)
        got = engine.generate(prompts, params)
        monkeypatch.undo()
        for (e,), (g,) in zip(expected, got):
            assert (g.token_ids, g.finish_reason, g.logprobs) == (e.token_ids, e.finish_reason, e.logprobs)
            torch.testing.assert_close(g.hidden_states, e.hidden_states)
            assert g.stats["decode_steps"] == (len(e.token_ids) + 1) // 2


# ---- tensor parallelism ----
TP_PROMPTS = [[3, 1, 4, 1, 5], [2, 7], list(range(60, 75))]


def _tp_worker(rank: int, world_size: int, state_dict_path: str, expected_greedy) -> None:
    torch.set_num_threads(1)
    ps = init_parallel(ParallelConfig(tensor_parallel_size=world_size))
    model = Policy(CFG, tp_group=ps.tp_group, init_weights=False).eval()
    load_full_state_dict(model, torch.load(state_dict_path), ps.tp_group)
    engine = make_engine(model)
    greedy = tokens_of(engine.generate(TP_PROMPTS, SamplingParams(temperature=0, max_new_tokens=10)))
    assert greedy == expected_greedy, f"rank {rank}: TP=2 greedy differs from TP=1"
    sampled = tokens_of(engine.generate(TP_PROMPTS, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, n=2)))
    every_rank = [None] * world_size
    dist.all_gather_object(every_rank, sampled, group=ps.tp_group)
    assert all(s == sampled for s in every_rank), "TP ranks sampled different tokens"


def test_tp2_matches_tp1(model, tmp_path):
    expected = tokens_of(make_engine(model).generate(TP_PROMPTS, SamplingParams(temperature=0, max_new_tokens=10)))
    path = tmp_path / "full.pt"
    torch.save(gather_full_state_dict(model), path)
    run_distributed(_tp_worker, world_size=2, args=(str(path), expected))


# ---- CLI ----
@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    # transformers is imported here, not at the top: the TP workers import this module and start faster
    from megatron_tlt.data.tokenizer import build_test_tokenizer

    path = tmp_path_factory.mktemp("hf_model")
    build_test_tokenizer(path, vocab_size=CFG.vocab_size)
    state_dict = tlt_to_hf_state_dict(gather_full_state_dict(model), CFG)
    write_hf_dir(path, hf_config_from_model_config(CFG), state_dict, generation_config={"eos_token_id": 1})
    return path


@pytest.mark.parametrize("precision", ["auto", "fp8"])
def test_cli_generate_jsonl(model, hf_dir, tmp_path, precision):
    from megatron_tlt.data.tokenizer import encode_prompt, load_tokenizer

    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "What is 2 + 3?"}) + "\n\n" + json.dumps({"input_ids": [5, 6, 7]}) + "\n")
    rc = cli_main([
        "generate", "--model", str(hf_dir), "--prompts", str(prompts_file), "--out", str(out),
        "--temperature", "0", "--max-new-tokens", "6", "--n", "2", "--max-seq-len", "48", "--kv-cache-gb", "0.001",
        "--precision", precision,
    ])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    tokenizer = load_tokenizer(hf_dir)
    prompts = [encode_prompt(tokenizer, "What is 2 + 3?"), [5, 6, 7]]
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=(1,), n=2)
    expected = make_engine(model, max_seq_len=48, precision=precision).generate(prompts, params)
    for row in rows:
        c = expected[row["prompt_index"]][row["sample_index"]]
        assert row["token_ids"] == c.token_ids and row["finish_reason"] == c.finish_reason
        assert row["logprobs"] == pytest.approx(c.logprobs, abs=1e-5)  # the FP8 policy's with --precision fp8
        assert row["response"] == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert len(row["logprobs"]) == len(row["token_ids"]) and row["stats"]["prompt_tokens"] == len(prompts[row["prompt_index"]])


@pytest.mark.parametrize(
    "lines,extra,message",
    [
        ([json.dumps({"input_ids": [1, 2]}), "{not json"], [], ":2: not valid JSON"),
        ([json.dumps({"input_ids": []})], [], ":1: 'input_ids' must be"),
        ([json.dumps({"prompt": "hi", "input_ids": [1]})], [], ":1: expected a JSON object"),
        ([json.dumps({"input_ids": [1, 2]}), json.dumps({"input_ids": [1, 9999]})], [], ":2: token id 9999"),
        ([json.dumps({"input_ids": [1, 2]})], ["--spec", "chain"], "--spec chain needs --drafter"),
        ([json.dumps({"input_ids": [1, 2]})], ["--top-p", "2"], "top_p"),
        ([json.dumps({"input_ids": [1, 2]})], ["--precision", "fp8", "--fp8-gemm", "triton"], "runs on CUDA only"),
    ],
)
def test_cli_generate_errors(hf_dir, tmp_path, capsys, lines, extra, message):
    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts_file.write_text("\n".join(lines) + "\n")
    rc = cli_main(["generate", "--model", str(hf_dir), "--prompts", str(prompts_file), "--out", str(out), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
