"""FP8 rollouts (rollout.precision=fp8): block quantization, the FP8 linear and its GEMM paths, the engine's FP8
weights (re-quantized after every update, attached only while generating), SD under FP8, TP, and bad input.

CPU, fp32 models; the FP8 math is the same on any device (e4m3 values, fp32 scales and accumulation).
"""
from __future__ import annotations

import logging

import pytest
import torch
import engine_utils
from dist_utils import run_distributed

from megatron_tlt.config.schema import ModelConfig, ParallelConfig
from megatron_tlt.coordinator.reshard import RolloutWeights
from megatron_tlt.drafter import Drafter
from megatron_tlt.errors import UserError
from megatron_tlt.models.transformer import Policy
from megatron_tlt.ops.fp8 import E4M3_MAX, dequantize_blocks, fp8_linear, quantize_activation, quantize_weight, resolve_gemm_path
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tlt.parallel.state import destroy_parallel, init_parallel
from megatron_tlt.rollout import DraftShape, RolloutEngine, SamplingParams
from megatron_tlt.rollout.fp8 import Fp8Weights

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=4,
                  max_position_embeddings=64, init_std=0.2)
PROMPTS = [[7], [3, 9, 27, 81, 15], list(range(10, 22)), [5, 6]]
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
BLOCK = 32  # TP = 2 shards of CFG's linears are multiples of 32


@pytest.fixture(scope="module")
def ps():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield init_parallel()
    destroy_parallel()
    torch.set_num_threads(threads)


@pytest.fixture
def model(ps):
    torch.manual_seed(0)
    return Policy(CFG, tp_group=ps.tp_group).eval().requires_grad_(False)


def _engine(model, **kw) -> RolloutEngine:
    return engine_utils.make_engine(model, 8, 64, precision="fp8", fp8_block=BLOCK, **kw)


def _e4m3_bound(w: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Half an e4m3 step at each element of w (tiles rows x cols): 2^-4 relative for normal values (3 mantissa
    bits), 2^-10 * scale in the subnormal range (spacing 2^-9 below 2^-6, in units of the tile's scale)."""
    s = scale.repeat_interleave(rows, 0)[: w.shape[0]].repeat_interleave(cols, 1)[:, : w.shape[1]]
    return torch.maximum(w.abs() * 2**-4, s * 2**-10) * (1 + 1e-6)


@pytest.mark.parametrize("shape,block", [((256, 256), 128), ((200, 72), 128), ((384, 300), 128), ((96, 80), 32)])
def test_quantize_dequantize_is_within_the_e4m3_bound_per_block(shape, block):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[0])[:, None]  # blocks of very different scales
    w[:block, :block] = 0  # an all-zero block: scale 1, exact zeros
    w8 = quantize_weight(w, block)
    assert w8.scale.shape == (-(-shape[0] // block), -(-shape[1] // block)) and w8.q.dtype == torch.float8_e4m3fn
    err = (w8.dequantize() - w).abs()
    assert bool((err <= _e4m3_bound(w, w8.scale, block, block)).all())
    assert w8.scale[0, 0] == 1 and bool((w8.dequantize()[:block, :block] == 0).all())
    # each block uses e4m3's range: its largest element maps to +-448
    for i in range(w8.scale.shape[0]):
        for j in range(w8.scale.shape[1]):
            tile = w8.q[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            assert tile.abs().max() == E4M3_MAX or (i, j) == (0, 0)
    x = torch.randn(5, shape[1], generator=g) * 30
    qx, sx = quantize_activation(x, block)
    assert sx.shape == (5, -(-shape[1] // block))
    assert bool(((dequantize_blocks(qx, sx, 1, block) - x).abs() <= _e4m3_bound(x, sx, 1, block)).all())


@pytest.mark.parametrize("shape", [(256, 256), (200, 72), (384, 300)])
def test_fp8_linear_equals_its_dequantized_reference_and_is_close_to_high_precision(shape):
    g = torch.Generator().manual_seed(2)
    w, x, b = torch.randn(shape, generator=g) * 0.05, torch.randn(3, 7, shape[1], generator=g), torch.randn(shape[0], generator=g)
    w8 = quantize_weight(w, 128)
    ref = fp8_linear(x, w8, b, path="reference")
    qx, sx = quantize_activation(x.reshape(-1, shape[1]), 128)
    by_hand = (dequantize_blocks(qx, sx, 1, 128) @ w8.dequantize().t()).reshape(3, 7, -1) + b
    torch.testing.assert_close(ref, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fp8_linear(x, w8, b, path="scaled_mm"), ref, rtol=1e-5, atol=1e-5)
    # Documented tolerance vs the high-precision linear: relative error of the output below 8% (measured ~3% for
    # Gaussian weights and activations: two e4m3 roundings of 2^-4 relative each, averaged over K products).
    exact = x @ w.t() + b
    assert float((ref - exact).norm() / exact.norm()) < 0.08


def _fp8_snapshot(fp8: Fp8Weights) -> dict[str, torch.Tensor]:
    return {n: w.dequantize().clone() for n, w in fp8.weights.items()}


def test_weights_are_requantized_after_every_update_and_attached_only_while_generating(ps, model):
    engine = _engine(model)
    weights = RolloutWeights(model, model, ps, keep=False, engine=engine)
    with weights.acquired(0):
        first = engine.generate(PROMPTS, GREEDY)
        before = _fp8_snapshot(engine.model_calls.fp8)
    assert weights.last["fp8_weight_bytes"] * 3.9 < weights.last["fp8_replaced_bytes"]  # fp32 -> e4m3 + scales
    assert all(m.fp8 is None for m in engine.model_calls.fp8.linears.values())  # training passes see fp32 weights
    with torch.no_grad():  # "an update"
        for p in model.parameters():
            p.mul_(1.5)
    with weights.acquired(1):
        second = engine.generate(PROMPTS, GREEDY)
        after = _fp8_snapshot(engine.model_calls.fp8)
    for name, m in engine.model_calls.fp8.linears.items():  # the new weights, quantized again (not the stale ones)
        assert not torch.equal(after[name], before[name])
        torch.testing.assert_close(after[name], quantize_weight(m.weight, BLOCK).dequantize(), rtol=0, atol=0)
    fresh = _engine(model).generate(PROMPTS, GREEDY)  # a new engine on the updated policy: what the rollout must give
    assert [c[0].token_ids for c in second] == [c[0].token_ids for c in fresh]
    assert [c[0].token_ids for c in second] != [c[0].token_ids for c in first]


def test_rollout_tokens_and_logprobs_are_the_fp8_policys_from_the_first_token(model):
    engine = _engine(model)
    fp8 = engine.model_calls.fp8
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    results = engine.generate(PROMPTS, params)
    for prompt, (c,) in zip(PROMPTS, results):
        seq = torch.tensor(prompt + c.token_ids)[None]
        with torch.no_grad(), fp8.active():
            fp8_logp = torch.log_softmax(model(seq).float(), -1)[0]
        with torch.no_grad():
            hp_logp = torch.log_softmax(model(seq).float(), -1)[0]
        at = torch.arange(len(prompt) - 1, seq.shape[1] - 1)
        want = fp8_logp[at, seq[0, at + 1]]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(torch.tensor(c.logprobs), hp_logp[at, seq[0, at + 1]], rtol=1e-4, atol=1e-4)
    greedy = engine.generate(PROMPTS, GREEDY)
    for prompt, (c,) in zip(PROMPTS, greedy):  # the first token after quantization: the FP8 prompt forward's argmax
        with torch.no_grad(), fp8.active():
            assert c.token_ids[0] == int(model(torch.tensor(prompt)[None])[0, -1].argmax())


@pytest.mark.parametrize("spec,shape", [("chain", DraftShape.chain(4)), ("tree", DraftShape(depth=4, topk=3, num_verify=10))])
def test_speculative_decoding_equals_plain_decoding_under_fp8(model, spec, shape):
    torch.manual_seed(1)
    drafter = Drafter(model).eval()
    plain = _engine(model).generate(PROMPTS, GREEDY)
    sd = _engine(model, drafter=drafter, spec=spec, draft_shape=shape).generate(PROMPTS, GREEDY)
    assert [c[0].token_ids for c in sd] == [c[0].token_ids for c in plain]
    for a, b in zip(sd, plain):
        torch.testing.assert_close(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), rtol=1e-4, atol=1e-4)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=24, n=2, seed=5)
    plain_t1 = _engine(model).generate(PROMPTS, sampled)
    sd_t1 = _engine(model, drafter=drafter, spec=spec, draft_shape=shape).generate(PROMPTS, sampled)
    assert [[c.token_ids for c in s] for s in sd_t1] == [[c.token_ids for c in s] for s in plain_t1]


def _tp_worker(rank, world, full_state, out):
    ps = init_parallel(ParallelConfig(tensor_parallel_size=2))
    model = Policy(CFG, tp_group=ps.tp_group, init_weights=False).eval().requires_grad_(False)
    load_full_state_dict(model, full_state, ps.tp_group)
    results = engine_utils.make_engine(model, 8, 64, precision="fp8", fp8_block=BLOCK).generate(PROMPTS, GREEDY)
    if rank == 0:
        torch.save([c[0].token_ids for c in results], out)
    with pytest.raises(UserError, match="splits a 128-wide FP8 block"):
        engine_utils.make_engine(model, 8, 64, precision="fp8", fp8_block=128)


def test_tp2_matches_tp1_and_a_tp_size_that_splits_a_block_is_refused(model, tmp_path):
    want = [c[0].token_ids for c in _engine(model).generate(PROMPTS, GREEDY)]
    full = gather_full_state_dict(model)
    run_distributed(_tp_worker, 2, (full, tmp_path / "tp2.pt"))
    assert torch.load(tmp_path / "tp2.pt") == want


def test_gemm_path_choice_and_bad_requests(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.INFO):
        assert resolve_gemm_path("auto", cpu) == "reference"
        assert resolve_gemm_path("scaled_mm", cpu) == "scaled_mm"
        assert resolve_gemm_path("auto", cuda, capability=(8, 0)) == "reference"  # an A100: logged fallback
    assert "FP8 GEMM path: reference: this GPU (sm80) has no FP8 tensor cores" in caplog.text
    with pytest.raises(UserError, match="runs on CUDA only"):
        resolve_gemm_path("triton", cpu)
    with pytest.raises(UserError, match=r"need FP8 tensor cores \(sm89\+\), this GPU is sm80"):
        resolve_gemm_path("scaled_mm", cuda, capability=(8, 0))
    with pytest.raises(UserError, match="needs triton"):
        resolve_gemm_path("triton", cuda, capability=(9, 0), triton_available=False)
    with pytest.raises(UserError, match="needs a CPU or CUDA device"):
        resolve_gemm_path("auto", torch.device("meta"))
