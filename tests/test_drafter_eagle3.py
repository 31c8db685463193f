"""The EAGLE-3 drafter (drafter/eagle3.py): its training-time-test loss (packed == per example, one step == the
plain next-token loss, the unrolled steps == drafting through the KV cache), the target features at no extra
forward (the update's forward and the packed forward == a plain forward's layer outputs), speculative decoding
with it exact, and the serving export (the layout SGLang's and vLLM's loaders read; a loader written from their
layout reproduces our logits). CPU, fp32.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed

from megatron_tlt.config.schema import AlgoConfig, Config, DrafterConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_tlt.coordinator.exchange import exchange_for_update
from megatron_tlt.drafter.data import from_trainer_output, make_batches, policy_examples
from megatron_tlt.drafter.eagle3 import Eagle3Drafter, default_feature_layers, frequent_tokens
from megatron_tlt.drafter.io import export_drafter, load_drafter, save_drafter
from megatron_tlt.drafter.loss import TTT_HIDDEN_WEIGHT, ttt_loss
from megatron_tlt.drafter.model import build_drafter
from megatron_tlt.drafter.trainer import DrafterTrainer
from megatron_tlt.models.kv_cache import CacheBatch
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tlt.rl.sample import Sample
from megatron_tlt.rollout import RolloutEngine, SamplingParams
from megatron_tlt.trainer.policy import PolicyTrainer

CFG = ModelConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2,
    max_position_embeddings=64,
)
LAYERS = (0, 1, 3)
DRAFT_VOCAB = list(range(0, CFG.vocab_size, 2))  # a reduced draft vocabulary: the even token ids
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def policy():
    ps = init_parallel()
    set_seed(0)
    yield Policy(CFG, ps.tp_group).eval()
    destroy_parallel()


def perturbed(policy, seed: int = 0, draft_vocab=None) -> Eagle3Drafter:
    """An EAGLE-3 drafter with every parameter away from its init (norms too), so no term is trivially zero."""
    set_seed(seed)
    drafter = Eagle3Drafter(policy, LAYERS, draft_vocab=draft_vocab)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return drafter


def sequences(lengths, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def loss_of(drafter, batch, steps, hidden_weight=TTT_HIDDEN_WEIGHT):
    return ttt_loss(drafter, batch.tokens, batch.hidden, batch.features, batch.cu_seqlens, batch.position_ids,
                    batch.loss_mask, steps=steps, hidden_weight=hidden_weight)


# ---- the target features ----
def test_features_are_the_layer_outputs_of_a_plain_forward(policy):
    """Packed forward (policy_examples) and the RL update's own forward (collect_hidden) return the outputs of the
    feature layers, equal to those of a plain dense forward of each sequence (taken by forward hooks)."""
    seqs = sequences([9, 5, 12], seed=1)
    examples = policy_examples(policy, seqs, max_tokens=64, feature_layers=LAYERS)
    for seq, ex in zip(seqs, examples):
        outputs = {}
        hooks = [policy.layers[str(i)].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.detach()))
                 for i in LAYERS]
        with torch.no_grad():
            final = policy.hidden_states(torch.tensor([seq]))[0]
        for h in hooks:
            h.remove()
        torch.testing.assert_close(ex.features, torch.cat([outputs[i][0] for i in LAYERS], dim=-1), **TOL)
        torch.testing.assert_close(ex.hidden, final, **TOL)

    ps = init_parallel()
    model = Policy(CFG, ps.tp_group)
    model.load_state_dict(policy.state_dict())
    samples = [Sample(s[:3], s[3:], [-1.0] * (len(s) - 3), reward=float(i % 2), advantage=i - 1.0, group=0)
               for i, s in enumerate(seqs)]
    reference = policy_examples(model, seqs, max_tokens=64, feature_layers=LAYERS)  # before the update
    trainer = PolicyTrainer(model, OptimConfig(lr=1e-2, micro_batch_tokens=16), AlgoConfig(), ps, total_steps=1)
    batch = exchange_for_update(samples, 16, ps)
    _, hidden = trainer.step(batch.samples, batch.micro_batches, max_response_len=16, collect_hidden=True, feature_layers=LAYERS)
    for s, ex, ref in zip(samples, from_trainer_output(samples, hidden, CFG.hidden_size), reference):
        start = len(s.prompt_ids) - 1
        assert ex.features.shape == (len(s.response_ids) + 1, 3 * CFG.hidden_size)
        torch.testing.assert_close(ex.hidden, ref.hidden[start:], **TOL)
        torch.testing.assert_close(ex.features, ref.features[start:], **TOL)


def test_default_feature_layers_are_the_servers_and_bad_ones_are_refused(policy):
    assert default_feature_layers(32) == (1, 15, 28)  # inputs of layers (2, 16, 29): SGLang's and vLLM's default
    assert default_feature_layers(4) == (0, 1, 3)
    with pytest.raises(ValueError, match=r"feature_layers must be 3 layer indices in \[0, 4\)"):
        Eagle3Drafter(policy, (0, 1, 4))
    with pytest.raises(ValueError, match="3 distinct layer indices"):
        DrafterConfig(feature_layers=[1, 1, 2])
    with pytest.raises(ValueError, match="is an eagle3 option"):
        DrafterConfig(arch="eagle", feature_layers=[0, 1, 2])
    with pytest.raises(ValueError, match="drafter.arch='eagle2' is not supported"):
        DrafterConfig(arch="eagle2")
    with pytest.raises(ValueError, match="below model.num_layers=4"):
        Config(model=CFG, drafter=DrafterConfig(feature_layers=[0, 1, 4]))


# ---- the loss ----
@pytest.mark.parametrize("draft_vocab", [None, DRAFT_VOCAB], ids=["policy_vocab", "draft_vocab"])
def test_packed_ttt_loss_is_the_sum_of_per_example_losses(policy, draft_vocab):
    drafter = perturbed(policy, draft_vocab=draft_vocab)
    examples = policy_examples(policy, sequences([7, 3, 10, 2], seed=2), max_tokens=64, feature_layers=LAYERS)
    (packed,) = make_batches(examples, max_tokens=64)
    loss, metrics = loss_of(drafter, packed, steps=3)
    alone = [loss_of(drafter, make_batches([e], max_tokens=64)[0], steps=3) for e in examples]
    torch.testing.assert_close(loss, sum(l for l, _ in alone), **TOL)
    assert metrics["num_tokens"] == sum(m["num_tokens"] for _, m in alone) == 6 + 2 + 9 + 1
    grads = torch.autograd.grad(loss, list(drafter.parameters()))
    summed = [sum(g) for g in zip(*(torch.autograd.grad(l, list(drafter.parameters())) for l, _ in alone))]
    for g, s in zip(grads, summed):
        torch.testing.assert_close(g, s, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("draft_vocab", [None, DRAFT_VOCAB], ids=["policy_vocab", "draft_vocab"])
def test_one_step_ttt_is_the_plain_next_token_loss(policy, draft_vocab):
    """steps=1, hidden_weight=0: the soft cross-entropy of the drafter's dense forward against softmax(lm_head(f_{t+1})),
    by hand (with a draft vocabulary: both over its tokens, the target's renormalised there); with hidden_weight=w,
    plus w x smooth_l1(norm(g_t), f_{t+1}) (mean over H) by hand."""
    drafter = perturbed(policy, seed=1, draft_vocab=draft_vocab)
    keep = torch.arange(CFG.vocab_size) if draft_vocab is None else torch.tensor(draft_vocab)
    examples = policy_examples(policy, sequences([8, 5], seed=3), max_tokens=64, feature_layers=LAYERS)
    (packed,) = make_batches(examples, max_tokens=64)
    loss, metrics = loss_of(drafter, packed, steps=1, hidden_weight=0.0)
    with_hidden, hidden_metrics = loss_of(drafter, packed, steps=1, hidden_weight=2.5)
    expected, regression, top1 = 0.0, 0.0, 0.0
    with torch.no_grad():
        for e in examples:
            L = e.tokens.shape[0]
            g = drafter(e.tokens[None, 1:], e.features[None, : L - 1], torch.arange(L - 1)[None])  # [1, L-1, H]
            q = drafter.compute_logits(g)[0][:, keep].log_softmax(-1)  # predicts x_{t+2}
            target = policy.compute_logits(e.hidden[None, 1:])[0]
            expected += -(target[:, keep].softmax(-1) * q).sum()
            top1 += (keep[q.argmax(-1)] == target.argmax(-1)).sum()
            regression += torch.nn.functional.smooth_l1_loss(drafter.norm(g[0]), e.hidden[1:], reduction="none").mean(-1).sum()
    torch.testing.assert_close(loss.detach(), torch.as_tensor(expected, dtype=loss.dtype), **TOL)
    assert metrics["num_tokens"] == 7 + 4 and math.isclose(float(metrics["top1"]), float(top1) / 11, abs_tol=1e-6)
    assert "hidden_loss" not in metrics and float(regression) > 0
    torch.testing.assert_close(with_hidden.detach(), torch.as_tensor(expected + 2.5 * regression, dtype=loss.dtype), **TOL)
    torch.testing.assert_close(hidden_metrics["hidden_loss"], torch.as_tensor(regression / 11, dtype=loss.dtype), **TOL)


def test_unrolled_steps_are_what_drafting_through_the_kv_cache_computes(policy):
    """Step j of the training-time test at position t == the j-th draft of a chain rooted at t, run as the engine
    runs it: the committed entries 0..t prefilled into the drafter's cache, then one cached call per level
    (token x_{t+1+j}, its parent's output, position t+j)."""
    drafter = perturbed(policy, seed=2)
    (ex,) = policy_examples(policy, sequences([12], seed=4), max_tokens=64, feature_layers=LAYERS)
    L, steps = ex.tokens.shape[0], 3
    t = torch.arange(L)
    ahead = torch.stack([ex.tokens[torch.clamp(t + 1 + j, max=L - 1)] for j in range(steps)])  # [k, L] x_{t+1+j}
    with torch.no_grad():
        unrolled = drafter.unroll(ahead, ex.features, t, torch.tensor([0, L], dtype=torch.int32))
        for root in (0, 4, 7):
            cache = drafter.new_cache(1, 32, torch.float32, "cpu")
            slots = torch.tensor([0])
            g = drafter(ex.tokens[None, 1 : root + 2], ex.features[None, : root + 1], t[None, : root + 1],
                        cache=CacheBatch(cache, slots, torch.tensor([0]), root + 1))[:, -1:]
            torch.testing.assert_close(g[0, 0], unrolled[0][root], **TOL)
            for j in range(1, steps):
                g = drafter(ex.tokens[None, root + 1 + j : root + 2 + j], g, torch.tensor([[root + j]]),
                            cache=CacheBatch(cache, slots, torch.tensor([root + j]), root + 1 + j))
                torch.testing.assert_close(g[0, 0], unrolled[j][root], **TOL, msg=lambda s: f"root {root} step {j}: {s}")


# ---- tensor parallelism ----
def _tp2_worker(rank, world_size, policy_weights, drafter_dir, batch, seqs, reference) -> None:
    tp_group = init_parallel(ParallelConfig(tensor_parallel_size=2)).tp_group
    policy = Policy(CFG, tp_group, init_weights=False)
    load_full_state_dict(policy, policy_weights, tp_group)
    policy.eval()
    examples = policy_examples(policy, seqs, max_tokens=64, feature_layers=LAYERS)  # the features at TP = 2
    for ex, f in zip(examples, reference["features"]):
        torch.testing.assert_close(ex.features, f, **TOL)
    sp = Policy(CFG, tp_group, init_weights=False, sequence_parallel=True)  # the update's forward under SP
    load_full_state_dict(sp, policy_weights, tp_group)
    _, features = sp.hidden_states(batch.tokens[None], position_ids=batch.position_ids[None], cu_seqlens=batch.cu_seqlens,
                                   max_seqlen=batch.max_seqlen, feature_layers=LAYERS)
    torch.testing.assert_close(features[0], batch.features, **TOL)
    drafter = load_drafter(drafter_dir, policy)  # saved at TP = 1, loaded as shards
    prompts = [s[:3] for s in seqs]
    engine = RolloutEngine(policy, max_seq_len=32, cache_budget_bytes=1 << 24, drafter=drafter, spec="tree")
    tokens = [c[0].token_ids for c in engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=3))]
    assert tokens == reference["tokens"]
    loss, _ = loss_of(drafter, batch, steps=3)
    torch.testing.assert_close(loss.detach(), reference["loss"], **TOL)
    metrics = DrafterTrainer(drafter, lr=1e-2, grad_clip=0.01, ttt_steps=3).step(batch)
    assert abs(metrics["grad_norm"] - reference["grad_norm"]) < 1e-4 * reference["grad_norm"], (metrics, reference)


@pytest.mark.parametrize("draft_vocab", [None, DRAFT_VOCAB], ids=["policy_vocab", "draft_vocab"])
def test_tp2_features_loss_training_and_decoding_equal_tp1(policy, tmp_path, draft_vocab):
    """TP = 2 (and the update's sequence-parallel forward): the target features, speculative decoding with the
    EAGLE-3 drafter, its TTT loss and its TP-global gradient norm equal TP = 1's."""
    seqs = sequences([9, 6], seed=7)
    examples = policy_examples(policy, seqs, max_tokens=64, feature_layers=LAYERS)
    (batch,) = make_batches(examples, max_tokens=64)
    drafter = perturbed(policy, seed=5, draft_vocab=draft_vocab)
    drafter_dir = save_drafter(tmp_path / "drafter", drafter)
    engine = RolloutEngine(policy, max_seq_len=32, cache_budget_bytes=1 << 24, drafter=drafter, spec="tree")
    tokens = [c[0].token_ids for c in engine.generate([s[:3] for s in seqs], SamplingParams(temperature=1.0, max_new_tokens=12, seed=3))]
    reference = {"features": [e.features for e in examples], "tokens": tokens, "loss": loss_of(drafter, batch, steps=3)[0].detach()}
    reference["grad_norm"] = DrafterTrainer(drafter, lr=1e-2, grad_clip=0.01, ttt_steps=3).step(batch)["grad_norm"]
    run_distributed(_tp2_worker, world_size=2, args=(gather_full_state_dict(policy), str(drafter_dir), batch, seqs, reference))


# ---- speculative decoding ----
@pytest.mark.parametrize("draft_vocab", [None, DRAFT_VOCAB], ids=["policy_vocab", "draft_vocab"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("spec", ["chain", "tree"])
def test_speculative_decoding_with_eagle3_equals_plain(policy, spec, temperature, draft_vocab):
    prompts = sequences([3, 5, 2, 4], seed=5)
    params = SamplingParams(temperature=temperature, max_new_tokens=16, seed=7)
    plain = RolloutEngine(policy, max_seq_len=32, cache_budget_bytes=1 << 24, return_hidden=True).generate(prompts, params)
    engine = RolloutEngine(policy, max_seq_len=32, cache_budget_bytes=1 << 24, drafter=perturbed(policy, draft_vocab=draft_vocab),
                           spec=spec, return_hidden=True)
    for p, s in zip(plain, engine.generate(prompts, params)):
        assert p[0].token_ids == s[0].token_ids
        torch.testing.assert_close(s[0].hidden_states, p[0].hidden_states, **TOL)  # final hidden states, not features
    assert engine.stats.spec_steps > 0


# ---- serving export ----
# What SGLang and vLLM read from the directory, from their loaders (sources and commits in drafter/io.py):
# SGLang python/sglang/srt/models/llama_eagle3.py: `LlamaForCausalLMEagle3.load_weights` maps a name n to n or
# f"model.{n}" in its params (the layer is `model.midlayer`, with `input_layernorm`, `hidden_norm`,
# `post_attention_layernorm`, `self_attn.qkv_proj` from q/k/v_proj over 2 * hidden_size, `mlp.gate_up_proj` from
# gate/up_proj, `down_proj`); `fc` = Linear(3 * target_hidden_size, hidden_size, bias=config.bias); `d2t` ->
# hot_token_id, `t2d` skipped. vLLM vllm/model_executor/models/llama_eagle3.py: `Eagle3LlamaForCausalLM.load_weights`
# prefixes "model." to all but lm_head, renames "midlayer." to "layers.0.", fc = ReplicatedLinear(3 *
# target_hidden_size, hidden_size, bias=False), lm_head = ParallelLMHead(draft_vocab_size, hidden_size), "d2t" ->
# draft_id_to_target_id [draft_vocab_size] (compute_logits puts draft logit d at target id d + d2t[d]), "t2d" skipped.
# SpecForge specforge/algorithms/eagle3/model.py: d2t int64 [draft_vocab_size], t2d bool [vocab_size].
SERVED_TENSORS = {
    "fc.weight": ("H", "3H"),
    "midlayer.input_layernorm.weight": ("H",),
    "midlayer.hidden_norm.weight": ("H",),
    "midlayer.self_attn.q_proj.weight": ("heads*D", "2H"),
    "midlayer.self_attn.k_proj.weight": ("kv_heads*D", "2H"),
    "midlayer.self_attn.v_proj.weight": ("kv_heads*D", "2H"),
    "midlayer.self_attn.o_proj.weight": ("H", "heads*D"),
    "midlayer.post_attention_layernorm.weight": ("H",),
    "midlayer.mlp.gate_proj.weight": ("I", "H"),
    "midlayer.mlp.up_proj.weight": ("I", "H"),
    "midlayer.mlp.down_proj.weight": ("H", "I"),
    "norm.weight": ("H",),
    "lm_head.weight": ("draft_vocab_size", "H"),
    "embed_tokens.weight": ("vocab_size", "H"),  # optional in both (shared from the target when absent)
}
VOCAB_MAPS = {"d2t": ("draft_vocab_size",), "t2d": ("vocab_size",)}  # with a reduced draft vocabulary only
SERVED_CONFIG_KEYS = (  # read by the two loaders / LlamaConfig for the drafter
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings", "vocab_size",
    "draft_vocab_size", "target_hidden_size", "tie_word_embeddings", "bias", "attention_bias",
    "eagle_aux_hidden_state_layer_ids", "eagle_config",
)


@pytest.fixture(params=[None, DRAFT_VOCAB], ids=["policy_vocab", "draft_vocab"])
def exported(policy, tmp_path, request):
    drafter = perturbed(policy, seed=3, draft_vocab=request.param)
    out = export_drafter(save_drafter(tmp_path / "drafter", drafter), tmp_path / "served", policy)
    from safetensors.torch import load_file

    return drafter, json.loads((out / "config.json").read_text()), load_file(out / "model.safetensors")


def test_export_has_the_layout_the_servers_read(exported):
    drafter, config, tensors = exported
    H, D = CFG.hidden_size, CFG.head_dim
    Vd = CFG.vocab_size if drafter.draft_ids is None else len(DRAFT_VOCAB)
    sizes = {"H": H, "3H": 3 * H, "2H": 2 * H, "heads*D": CFG.num_attention_heads * D, "kv_heads*D": CFG.num_kv_heads * D,
             "I": CFG.intermediate_size, "draft_vocab_size": Vd, "vocab_size": CFG.vocab_size}
    expected = {**SERVED_TENSORS, **(VOCAB_MAPS if drafter.draft_ids is not None else {})}
    assert sorted(tensors) == sorted(expected)  # none missing, none unexpected
    for name, shape in expected.items():
        assert tuple(tensors[name].shape) == tuple(sizes[s] for s in shape), name
    if drafter.draft_ids is not None:
        assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
        assert (torch.arange(Vd) + tensors["d2t"]).tolist() == DRAFT_VOCAB == tensors["t2d"].nonzero().squeeze(1).tolist()
    assert set(SERVED_CONFIG_KEYS) <= set(config)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1 and config["target_hidden_size"] == H and config["draft_vocab_size"] == Vd
    assert config["bias"] is False and config["attention_bias"] is False and config["tie_word_embeddings"] is False
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(LAYERS)  # SGLang: layer outputs
    assert config["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in LAYERS]  # vLLM: layer inputs


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, positions, theta):  # x [S, heads, D], rotate-half RoPE as Llama's
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = positions[:, None].double() * inv[None]  # [S, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None].float(), torch.cat([ang.sin()] * 2, -1)[:, None].float()
    return x * cos + torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1) * sin


def reference_eagle3_step(w: dict, c: dict, tokens, hidden, positions):
    """One EAGLE-3 forward over a causal sequence, written from the servers' layout only (config.json + tensors):
    h = fc(hidden) if it is 3H wide; x = [input_layernorm(embed); hidden_norm(h)]; attention with residual h;
    MLP; returns (logits over the target vocabulary: draft logit d at target id d + d2t[d], -inf at the others;
    the pre-norm output)."""
    eps, n, kv, D = c["rms_norm_eps"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    h = hidden @ w["fc.weight"].T if hidden.shape[-1] == 3 * c["target_hidden_size"] else hidden
    x = torch.cat([_rms(w["embed_tokens.weight"][tokens], w["midlayer.input_layernorm.weight"], eps),
                   _rms(h, w["midlayer.hidden_norm.weight"], eps)], -1)
    S = tokens.shape[0]
    q = _rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(S, n, D), positions, c["rope_theta"])
    k = _rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(S, kv, D), positions, c["rope_theta"])
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(S, kv, D)
    k, v = k.repeat_interleave(n // kv, 1), v.repeat_interleave(n // kv, 1)
    scores = torch.einsum("shd,thd->hst", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.einsum("hst,thd->shd", scores.softmax(-1), v).reshape(S, n * D) @ w["midlayer.self_attn.o_proj.weight"].T
    a = h + attn
    m = _rms(a, w["midlayer.post_attention_layernorm.weight"], eps)
    g = a + (F.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (m @ w["midlayer.mlp.up_proj.weight"].T)) @ w["midlayer.mlp.down_proj.weight"].T
    draft = _rms(g, w["norm.weight"], eps) @ w["lm_head.weight"].T  # [S, draft_vocab_size]
    if "d2t" not in w:
        return draft, g
    logits = draft.new_full((S, c["vocab_size"]), float("-inf"))
    logits[:, torch.arange(c["draft_vocab_size"]) + w["d2t"]] = draft
    return logits, g


def test_a_loader_from_the_served_layout_reproduces_our_logits(policy, exported):
    """The exported directory, run by a loader written from the servers' layout, gives our drafter's logits at the
    target positions and at a second draft step that feeds the pre-norm output back."""
    drafter, config, tensors = exported
    (ex,) = policy_examples(policy, sequences([10], seed=6), max_tokens=64, feature_layers=LAYERS)
    L = ex.tokens.shape[0]
    tokens, positions = ex.tokens[1:], torch.arange(L - 1)
    with torch.no_grad():
        ours_g = drafter(tokens[None], ex.features[None, : L - 1], positions[None])
        ours = drafter.compute_logits(ours_g)[0]
        ref, ref_g = reference_eagle3_step(tensors, config, tokens, ex.features[: L - 1], positions)
        torch.testing.assert_close(ours, ref, **TOL)
        # draft step 2 of each position, a chain of one node: fed (the next token, its own output) at position + 1
        ours_2 = drafter.compute_logits(drafter(tokens[None, 1:], ours_g[:, :-1], positions[None, 1:]))[0]
        ref_2, _ = reference_eagle3_step(tensors, config, tokens[1:], ref_g[:-1], positions[1:])
    assert ref.argmax(-1).tolist() == ours.argmax(-1).tolist()
    # the reference's own causal attention over its second-step inputs (not a TTT mask): ours on the same inputs
    torch.testing.assert_close(ours_2, ref_2, **TOL)


def test_save_load_round_trip_keeps_arch_feature_layers_and_draft_vocab(policy, tmp_path):
    drafter = perturbed(policy, seed=4, draft_vocab=DRAFT_VOCAB)
    loaded = load_drafter(save_drafter(tmp_path / "d", drafter), policy)
    assert isinstance(loaded, Eagle3Drafter) and loaded.feature_layers == LAYERS
    assert loaded.draft_ids.tolist() == DRAFT_VOCAB and loaded.lm_head.weight.shape == (len(DRAFT_VOCAB), CFG.hidden_size)
    for (name, p), q in zip(drafter.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    assert type(build_drafter(policy, "eagle")).__name__ == "Drafter"
    fresh = Eagle3Drafter(policy, LAYERS, draft_vocab=DRAFT_VOCAB)  # its own head starts as the policy's rows
    torch.testing.assert_close(fresh.lm_head.weight, policy.output_weight()[DRAFT_VOCAB])
    assert frequent_tokens([[5, 5, 7, 9], [7, 5, 3]], 3, CFG.vocab_size) == [3, 5, 7]  # 5 x3, 7 x2, then the smaller id
    with pytest.raises(ValueError, match="distinct token ids"):
        Eagle3Drafter(policy, LAYERS, draft_vocab=[1, 1, 2])
