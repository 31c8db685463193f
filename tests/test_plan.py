"""The memory plan (`megatron_tlt.plan`): its byte counts equal the sizes of the tensors it counts.

Weights, gradients, AdamW state (plain, and ZeRO-sharded at DP = 2 over real gloo processes), the rollback
copy and the foreach step's transient of a built tiny model after one optimizer step; the TP shard shapes it
derives from a TP = 1 meta build against a real TP = 2 build; the bytes autograd saves per decoder layer; the
CLI; and that the README's "what fits" settings fit.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_tlt.cli import main
from megatron_tlt.config import load_config
from megatron_tlt.config.schema import Config, ModelConfig, OptimConfig, ParallelConfig, RolloutConfig
from megatron_tlt.data.packing import pack_sequences
from megatron_tlt.models.packed import packed_forward
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import init_parallel
from megatron_tlt.plan import layer_activation_bytes, local_shapes, memory_plan
from megatron_tlt.trainer.optimizer import build_optimizer, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "llama": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=3, num_attention_heads=4, num_kv_heads=2),
    "qwen2_bf16_tied": ModelConfig(arch="qwen2", vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=2,
                                   num_attention_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
                                   params_dtype="bfloat16"),
    "qwen3": ModelConfig(arch="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_attention_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True),
}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _one_step(model: Policy, optimizer) -> None:
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 12))
    model(tokens).float().logsumexp(-1).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_gradient_and_optimizer_bytes_equal_the_real_tensors(name):
    ps = init_parallel()
    cfg = Config(model=MODELS[name])
    model = Policy(cfg.model, ps.tp_group)
    optimizer = build_optimizer(model.parameters(), cfg.optim, ps)
    _one_step(model, optimizer)
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values()]
    weights, saved_state = snapshot(optimizer)
    rank = memory_plan(cfg, world_size=1, group=ps.tp_group).ranks[0]
    assert rank.weights == _nbytes(params)
    assert rank.grads == _nbytes(p.grad for p in params)
    assert rank.optimizer == _nbytes(state)
    assert rank.rollback == _nbytes(weights) + _nbytes(v for s in saved_state.values() for v in s.values())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("gemm", ["auto", "reference"])
def test_fp8_rollout_bytes_equal_the_quantized_tensors(name, gemm):
    """rollout.precision=fp8: the plan's FP8 weights are the e4m3 values + scales Fp8Weights holds (+ the reference
    path's fp32 copy when the config asks for that path; `auto` on a GPU with FP8 matmuls keeps none)."""
    from megatron_tlt.rollout import Fp8Weights

    ps = init_parallel()
    cfg = Config(model=MODELS[name], rollout=RolloutConfig(precision="fp8", fp8_gemm=gemm, fp8_block=32))
    fp8 = Fp8Weights(Policy(cfg.model, ps.tp_group), block=32, gemm="reference")
    fp8.load()
    held = sum(w.nbytes + (w.dequantized.numel() * 4 if gemm == "reference" else 0) for w in fp8.weights.values())
    assert memory_plan(cfg, world_size=1, group=ps.tp_group).ranks[0].fp8_weights == held > 0
    cfg.rollout.precision = "auto"
    assert memory_plan(cfg, world_size=1, group=ps.tp_group).ranks[0].fp8_weights == 0


def test_optimizer_step_transient_is_one_moment_of_the_foreach_step():
    """torch AdamW's foreach step (CUDA's default; asked for here on CPU): the peak of the allocator's events
    during a step, above what was alive before it, is the plan's step transient (+ a few bytes of scalars)."""
    ps = init_parallel()
    cfg = Config(model=MODELS["llama"])
    model = Policy(cfg.model, ps.tp_group)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    _one_step(model, optimizer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    alive = peak = 0
    for e in events:
        alive += e.nbytes()
        peak = max(peak, alive)
    step = memory_plan(cfg, world_size=1, group=ps.tp_group).ranks[0].optimizer_step
    assert 0 <= peak - step <= 64, (peak, step)


def _zero_worker(rank: int, world_size: int) -> None:
    ps = init_parallel()
    cfg = Config(model=MODELS["llama"], optim=OptimConfig(distributed=True))
    torch.manual_seed(0)
    model = Policy(cfg.model, ps.tp_group)
    optimizer = build_optimizer(model.parameters(), cfg.optim, ps)
    _one_step(model, optimizer)
    mine = _nbytes(v for s in optimizer.optim.state.values() for v in s.values())
    every = [None] * world_size
    dist.all_gather_object(every, mine)
    plan = memory_plan(cfg, world_size=world_size, group=ps.tp_group).ranks[0]
    assert plan.optimizer == max(every), (plan.optimizer, every)
    assert plan.weights == _nbytes(model.parameters())  # parameters (and gradients) stay replicated: ZeRO-1


def test_distributed_optimizer_bytes_equal_zeros_fullest_rank():
    run_distributed(_zero_worker, world_size=2)


def _tp_worker(rank: int, world_size: int, expected: dict) -> None:
    ps = init_parallel(ParallelConfig(tensor_parallel_size=2))
    for name, shapes in expected.items():
        model = Policy(MODELS[name], ps.tp_group, init_weights=False)
        assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes, name


def test_tp_shard_shapes_from_a_meta_build_equal_a_real_tp2_build():
    ps = init_parallel()
    expected = {}
    for name, cfg in MODELS.items():
        with torch.device("meta"):
            expected[name] = local_shapes(Policy(cfg, ps.tp_group, init_weights=False), tp=2)
    run_distributed(_tp_worker, world_size=2, args=(expected,))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_activation_bytes_equal_what_autograd_saves(dtype):
    """Two models that differ by one layer: the difference of the bytes saved for backward (distinct storages,
    parameters excluded) is the plan's bytes per token and layer."""
    ps = init_parallel()
    batch = pack_sequences([list(range(1, 65))] * 4)

    def saved_bytes(num_layers: int) -> tuple[int, ModelConfig]:
        cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=num_layers,
                          num_attention_heads=4, num_kv_heads=4, params_dtype=dtype)
        model = Policy(cfg, ps.tp_group)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            packed_forward(model, batch, compute_entropy=True)
        return sum(n for ptr, n in storages.items() if ptr not in params), cfg

    one, _ = saved_bytes(1)
    two, cfg = saved_bytes(2)
    e = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert (two - one) == len(batch.tokens) * layer_activation_bytes(cfg, tp=1, sp=False, e=e, recompute="none")


def test_plan_cli_prints_each_stage_and_exit_code_says_whether_it_fits(capsys):
    assert main(["plan", "examples/configs/tiny.yaml", "parallel.tensor_parallel_size=2", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "TP 2 x PP 1 (vpp 1) x DP 2 = 4 GPUs" in out and "training total" in out and "DOES NOT FIT" not in out
    assert main(["plan", "examples/configs/tiny.yaml", "rollout.kv_cache_gb=100", "--device-gb", "80"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


QWEN7B = ["model.arch=qwen2", "model.vocab_size=152064", "model.hidden_size=3584", "model.intermediate_size=18944",
          "model.num_layers=28", "model.num_attention_heads=28", "model.num_kv_heads=4", "model.qkv_bias=true",
          "model.head_dim=128", "model.params_dtype=bfloat16", "model.max_position_embeddings=32768"]
TP4_SP = ["parallel.tensor_parallel_size=4", "parallel.sequence_parallel=true", "optim.distributed=true"]
RECIPE_7B, RECIPE_32B, RECIPE_70B = (f"examples/configs/grpo_{m}_math.yaml" for m in ("qwen2.5_7b", "qwen2.5_32b", "llama3.3_70b"))
README_TABLE = [  # (recipe, overrides, GPUs): the rows of the README's "what fits" table that fit
    (RECIPE_7B, QWEN7B + TP4_SP, 8), (RECIPE_7B, QWEN7B + TP4_SP, 16), (RECIPE_7B, QWEN7B + TP4_SP, 32),
    (RECIPE_32B, ["rollout.kv_cache_gb=12"], 8), (RECIPE_32B, [], 16), (RECIPE_32B, ["optim.recompute=selective"], 32),
    (RECIPE_70B, ["rollout.kv_cache_gb=8"], 16), (RECIPE_70B, [], 32),
]


@pytest.mark.parametrize("recipe,overrides,world", README_TABLE)
def test_the_readme_layouts_fit_80gb(recipe, overrides, world):
    ps = init_parallel()
    plan = memory_plan(load_config(recipe, ["run.model_path=null", "data.path=null", *overrides]), world, ps.tp_group)
    assert all(max(r.training_bytes, r.rollout_bytes) <= 80 * 2**30 for r in plan.ranks)


def test_pipelined_eagle3_features_widen_the_activations_between_stages():
    """At PP > 1 an online EAGLE-3 drafter's three feature slots travel with the activations (trainer.schedule): every
    rank holds e * 3H more per token of each micro-batch in flight (received on the last stage, sent on the first)."""
    ps = init_parallel()
    base = ["parallel.pipeline_parallel_size=2", "rollout.spec=chain", "model.num_layers=4"]
    eagle, eagle3 = (memory_plan(load_config("examples/configs/tiny.yaml", [*base, f"drafter.arch={arch}"]), 2, ps.tp_group)
                     for arch in ("eagle", "eagle3"))
    e, H, T = 4, 64, 1024  # fp32, tiny.yaml's hidden size and micro-batch tokens
    for a, b in zip(eagle.ranks, eagle3.ranks):
        assert b.activations - a.activations == T * b.in_flight * e * 3 * H
    assert memory_plan(load_config("examples/configs/tiny.yaml", [*base, "drafter.online=false"]), 2, ps.tp_group).ranks[0].activations \
        == eagle.ranks[0].activations  # a frozen drafter takes no features from the update
