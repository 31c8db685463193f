"""Drafter training: the EAGLE loss's alignment and example boundaries, chunked == unchunked vocabulary terms,
a trainer that touches only the drafter (and resumes exactly), offline warm-up that makes the drafter agree
with a tiny trained policy, save/load (also at TP=2, two gloo processes), the EAGLE head's export refused, and the
`train-drafter` / `export-drafter` commands. CPU, fp32.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from train_utils import fit_packed

from megatron_tlt.cli import main as cli_main
from megatron_tlt.config.schema import ModelConfig, ParallelConfig
from megatron_tlt.drafter import Drafter
from megatron_tlt.drafter.io import (
    WEIGHTS_FILE,
    export_drafter,
    load_drafter,
    read_drafter_weights,
    save_drafter,
)
from megatron_tlt.drafter.data import DrafterExample, make_batches, policy_examples
from megatron_tlt.drafter.loss import VOCAB_CHUNK_TOKENS, drafter_loss
from megatron_tlt.drafter.trainer import DrafterTrainer, evaluate_drafter, train_drafter_offline
from megatron_tlt.drafter.eagle3 import Eagle3Drafter
from megatron_tlt.errors import CheckpointError, UserError
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed
from megatron_tlt.rollout import RolloutEngine, SamplingParams

CFG = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
    max_position_embeddings=64,
)
TOL = dict(rtol=1e-4, atol=1e-5)


def counting_sequences(n: int, gen: torch.Generator, length: int = 24) -> list[list[int]]:
    """s, s+d, s+2d, ... (mod vocab) with d in {1, 2, 3}: a pattern a tiny policy learns in a few steps."""
    out = []
    for _ in range(n):
        start, stride = int(torch.randint(0, CFG.vocab_size, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
        out.append([(start + i * stride) % CFG.vocab_size for i in range(length)])
    return out


@pytest.fixture(scope="module")
def policy():
    """A tiny policy trained to continue counting sequences (so its greedy outputs have learnable structure)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats several fighting over shared cores
    ps = init_parallel()
    set_seed(0)
    model = Policy(CFG, tp_group=ps.tp_group)
    gen = torch.Generator().manual_seed(0)
    fit_packed(model, lambda: counting_sequences(16, gen), steps=60)
    yield model.eval()
    destroy_parallel()
    torch.set_num_threads(threads)


def perturbed_drafter(policy, seed: int = 0) -> Drafter:
    """A drafter with every parameter (norm weights too) away from its init, so no term is trivially zero."""
    set_seed(seed)
    drafter = Drafter(policy)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return drafter


def random_examples(policy, lengths: list[int], seed: int) -> list[DrafterExample]:
    """Random token sequences with the policy's real hidden states over them."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, CFG.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    return policy_examples(policy, seqs, max_tokens=256)


def loss_of(drafter, batch, **kw):
    return drafter_loss(
        drafter, batch.tokens, batch.hidden, batch.cu_seqlens, batch.position_ids, batch.loss_mask, max_seqlen=batch.max_seqlen, **kw
    )


# ---- the loss ----
def test_loss_alignment_on_a_hand_checkable_case(policy, monkeypatch):
    examples = random_examples(policy, [5, 3], seed=1)
    (batch,) = make_batches(examples, max_tokens=64)
    x, f = batch.tokens, batch.hidden  # [8], [8, H]
    ends = torch.tensor([4, 7])  # each example's last position: no next token, never trained
    drafter = Drafter(policy)
    seen = {}

    def fake_forward(prediction):
        def forward(tokens, target_hidden, position_ids, cu_seqlens=None, max_seqlen=None):
            seen.update(tokens=tokens[0], hidden=target_hidden[0], positions=position_ids[0])
            return prediction[None].clone().requires_grad_()
        return forward

    # An oracle whose g_t is exactly the policy's next hidden state f_{t+1} (garbage where there is none).
    oracle = f.roll(-1, 0).clone()
    oracle[ends] = 1e3
    monkeypatch.setattr(drafter, "forward", fake_forward(oracle))
    _, m = loss_of(drafter, batch)
    # Position t consumes (x_{t+1}, f_t) at position id t.
    assert seen["tokens"][[0, 1, 2, 3, 5, 6]].tolist() == x[[1, 2, 3, 4, 6, 7]].tolist()
    assert seen["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and torch.equal(seen["hidden"], f)
    assert m["num_tokens"] == 6 and m["hidden_loss"] == 0 and m["top1"] == 1
    trained = torch.tensor([0, 1, 2, 3, 5, 6])
    target_probs = policy.compute_logits(f[trained + 1][None])[0].softmax(-1)  # [6, V] softmax(lm_head(f_{t+1}))
    entropy = -(target_probs * target_probs.log()).sum(-1).mean()  # soft CE of a perfect prediction
    torch.testing.assert_close(m["ce_loss"], entropy, **TOL)

    # A drafter that copies its input hidden (g_t = f_t) is off by one step: its regression loss is the
    # smooth L1 between consecutive hidden states of the same example, never across examples.
    monkeypatch.setattr(drafter, "forward", fake_forward(f))
    loss, m = loss_of(drafter, batch)
    expected = sum(F.smooth_l1_loss(f[t], f[t + 1]) for t in trained.tolist()) / 6
    torch.testing.assert_close(m["hidden_loss"], expected, **TOL)
    torch.testing.assert_close(loss, 6 * (m["hidden_loss"] + 0.1 * m["ce_loss"]), **TOL)


@pytest.mark.parametrize("vocab_chunk_tokens", [VOCAB_CHUNK_TOKENS, 3])
def test_packed_loss_is_the_sum_of_per_example_losses(policy, vocab_chunk_tokens):
    examples = random_examples(policy, [5, 1, 7], seed=2)
    drafter = perturbed_drafter(policy)
    (packed,) = make_batches(examples, max_tokens=64)
    loss, m = loss_of(drafter, packed, vocab_chunk_tokens=vocab_chunk_tokens)  # chunked: recomputed in backward
    loss.backward()
    packed_grads = {name: p.grad.clone() for name, p in drafter.named_parameters()}
    drafter.zero_grad()

    alone = [loss_of(drafter, make_batches([e], max_tokens=64)[0]) for e in examples]
    total = sum(loss_i for loss_i, _ in alone)
    total.backward()
    torch.testing.assert_close(loss, total, **TOL)
    assert m["num_tokens"] == sum(m_i["num_tokens"] for _, m_i in alone) == 4 + 0 + 6
    for name, p in drafter.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, **TOL, msg=lambda s: f"grad of {name}: {s}")
    assert all(p.grad is None for p in policy.parameters())


# ---- the trainer ----
def test_trainer_changes_only_the_drafter_and_resumes_exactly(policy):
    batches = make_batches(random_examples(policy, [9, 6, 12, 4], seed=3), max_tokens=16)
    assert len(batches) > 1 and all(b.num_tokens <= 16 for b in batches)
    policy_before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    drafter = perturbed_drafter(policy)
    drafter_before = {name: p.detach().clone() for name, p in drafter.named_parameters()}
    trainer = DrafterTrainer(drafter, lr=1e-2, weight_decay=0.01, max_tokens_per_micro_batch=16, grad_clip=0.5)
    for batch in batches:
        metrics = trainer.step(batch)
        assert metrics["skipped"] == 0 and metrics["num_tokens"] > 0 and 0 <= metrics["top1"] <= 1
    assert trainer.steps == len(batches)
    for name, p in policy.named_parameters():
        assert torch.equal(p, policy_before[name]), name
    assert all(p.requires_grad and p.grad is None for p in policy.parameters())  # flags restored, no grads
    for name, p in drafter.named_parameters():
        assert not torch.equal(p, drafter_before[name]), f"{name} did not train"

    # Resume: a fresh trainer loaded from the state takes the very same next step.
    state = copy.deepcopy(trainer.state_dict())
    expected = trainer.step(batches[0])
    other = DrafterTrainer(perturbed_drafter(policy, seed=7), lr=1e-2, weight_decay=0.01, max_tokens_per_micro_batch=16, grad_clip=0.5)
    other.load_state_dict(state)
    got = other.step(batches[0])
    assert got["loss"] == expected["loss"] and other.steps == trainer.steps
    for (name, p), q in zip(drafter.named_parameters(), other.drafter.parameters()):
        assert torch.equal(p, q), name

    with pytest.raises(ValueError, match="exceeds max_tokens_per_micro_batch"):
        DrafterTrainer(drafter, max_tokens_per_micro_batch=8).step(batches[0])


def test_a_non_finite_step_is_skipped(policy):
    (batch,) = make_batches(random_examples(policy, [6], seed=4), max_tokens=16)
    batch.hidden[2] = float("nan")
    drafter = perturbed_drafter(policy)
    before = {name: p.detach().clone() for name, p in drafter.named_parameters()}
    metrics = DrafterTrainer(drafter).step(batch)
    assert metrics["skipped"] == 1
    for name, p in drafter.named_parameters():
        assert torch.equal(p, before[name]), name


def test_offline_training_makes_the_drafter_agree_with_the_policy(policy):
    gen = torch.Generator().manual_seed(5)
    prompts = [s[:3] for s in counting_sequences(48, gen)]
    engine = RolloutEngine(policy, max_seq_len=48, cache_budget_bytes=1 << 24)
    samples = [p + c[0].token_ids for p, c in zip(prompts, engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24)))]
    train, held_out = samples[:40], samples[40:]
    held_out_batches = make_batches(policy_examples(policy, held_out, max_tokens=512), max_tokens=512)

    set_seed(1)
    untrained = evaluate_drafter(Drafter(policy), held_out_batches)
    set_seed(1)
    log = []
    drafter = train_drafter_offline(policy, train, steps=200, lr=3e-3, max_tokens_per_micro_batch=256, on_step=lambda s, m: log.append(m),
                                    arch="eagle")
    trained = evaluate_drafter(drafter, held_out_batches)
    print(f"held-out top-1 agreement: untrained {untrained['top1']:.3f} -> trained {trained['top1']:.3f}")
    assert untrained["top1"] < 0.2 and trained["top1"] > 0.6
    assert trained["hidden_loss"] < 0.5 * untrained["hidden_loss"] and trained["ce_loss"] < untrained["ce_loss"]
    assert len(log) == 200 and not any(m["skipped"] for m in log)


# ---- save / load / export ----
def test_save_load_round_trip_and_errors(policy, tmp_path):
    drafter = perturbed_drafter(policy)
    path = save_drafter(tmp_path / "drafter", drafter, meta={"step": 3})
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "drafter.safetensors", "drafter_config.json", "meta.json"]
    assert not list(tmp_path.glob("*.tmp-*"))
    loaded = load_drafter(path, policy)
    for (name, p), q in zip(drafter.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    assert loaded.policy is policy
    save_drafter(path, loaded)  # replacing a drafter directory is allowed
    with pytest.raises(CheckpointError, match="not a drafter directory"):
        save_drafter(tmp_path, drafter)

    other = Policy(ModelConfig(**{**vars(CFG), "intermediate_size": 48}), tp_group=policy.tp_group)
    with pytest.raises(CheckpointError, match=r"'layer\.mlp\.gate_proj\.weight' has shape \(64, 32\)"):
        load_drafter(path, other)
    other = Policy(ModelConfig(**{**vars(CFG), "rope_theta": 500000.0}), tp_group=policy.tp_group)
    with pytest.raises(CheckpointError, match="rope_theta=10000.0 in the drafter but 500000.0"):
        load_drafter(path, other)

    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_drafter(path, policy)
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_drafter(path, policy)


def test_export_refuses_an_eagle_drafter(policy, tmp_path):
    """No serving engine loads the EAGLE head's layer-0 input norm and final norm: its export is refused, clearly."""
    drafter_dir = save_drafter(tmp_path / "drafter", perturbed_drafter(policy))
    with pytest.raises(UserError, match="eagle drafter, which no serving engine loads as is"):
        export_drafter(drafter_dir, tmp_path / "hf", policy)
    assert not (tmp_path / "hf").exists()


def _tp2_worker(rank: int, world_size: int, policy_weights, drafter_dir, batch, reference, out_dir) -> None:
    tp_group = init_parallel(ParallelConfig(tensor_parallel_size=2)).tp_group
    policy = Policy(CFG, tp_group=tp_group, init_weights=False)
    load_full_state_dict(policy, policy_weights, tp_group)
    drafter = load_drafter(drafter_dir, policy)  # saved at TP=1, loaded as shards
    loss, _ = loss_of(drafter, batch)
    torch.testing.assert_close(loss.detach(), reference["loss"], **TOL)
    metrics = DrafterTrainer(drafter, lr=1e-2, grad_clip=0.01).step(batch)
    # The clipping norm is the TP-global one: the same as at TP=1, so replicated weights stay in sync.
    assert abs(metrics["grad_norm"] - reference["grad_norm"]) < 1e-4 * reference["grad_norm"], (metrics["grad_norm"], reference)
    save_drafter(out_dir, drafter)  # gathered to full tensors


def test_tensor_parallel_load_train_save(policy, tmp_path):
    (batch,) = make_batches(random_examples(policy, [7, 5], seed=6), max_tokens=64)
    drafter = perturbed_drafter(policy)
    drafter_dir = save_drafter(tmp_path / "drafter", drafter)
    reference = {"loss": loss_of(drafter, batch)[0].detach()}
    reference["grad_norm"] = DrafterTrainer(drafter, lr=1e-2, grad_clip=0.01).step(batch)["grad_norm"]
    run_distributed(_tp2_worker, world_size=2, args=(gather_full_state_dict(policy), str(drafter_dir), batch, reference, str(tmp_path / "tp2")))
    *_, saved = read_drafter_weights(tmp_path / "tp2")
    for name, p in drafter.named_parameters():  # after the same step at TP=2 and at TP=1
        torch.testing.assert_close(saved[name], p.detach(), **TOL, msg=lambda s: f"{name}: {s}")


# ---- CLI ----
@pytest.fixture(scope="module")
def hf_dir(policy, tmp_path_factory):
    from megatron_tlt.data.tokenizer import build_test_tokenizer
    from megatron_tlt.models.hf import hf_config_from_model_config, tlt_to_hf_state_dict, write_hf_dir

    path = tmp_path_factory.mktemp("hf_model")
    build_test_tokenizer(path, vocab_size=CFG.vocab_size)
    write_hf_dir(path, hf_config_from_model_config(CFG), tlt_to_hf_state_dict(gather_full_state_dict(policy), CFG))
    return path


def test_cli_train_and_export_drafter(policy, hf_dir, tmp_path, capsys):
    gen = torch.Generator().manual_seed(8)
    rows = [{"input_ids": s[:3], "response_ids": s[3:]} for s in counting_sequences(4, gen)]
    rows += [{"input_ids": s[:3]} for s in counting_sequences(4, gen)]  # responses generated by the policy
    data = tmp_path / "samples.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "drafter"
    rc = cli_main([
        "train-drafter", "--model", str(hf_dir), "--data", str(data), "--out", str(out), "--steps", "12",
        "--lr", "3e-3", "--max-new-tokens", "10", "--log-every", "5", "--max-tokens-per-micro-batch", "64",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "generated" in printed and "step 5/12" in printed and "step 12/12" in printed and "top1" in printed
    drafter = load_drafter(out, policy)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["steps"] == 12 and meta["num_sequences"] == 8
    assert isinstance(drafter, Eagle3Drafter)  # the default arch

    assert cli_main(["export-drafter", "--drafter", str(out), "--policy", str(hf_dir), "--out", str(tmp_path / "hf_eagle")]) == 0
    assert json.loads((tmp_path / "hf_eagle" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]


@pytest.mark.parametrize(
    "lines,message",
    [
        ([json.dumps({"input_ids": [1, 2]}), "{not json"], ":2: not valid JSON"),
        ([json.dumps({"response_ids": [1, 2]})], ":1: expected a JSON object with 'input_ids'"),
        ([json.dumps({"input_ids": []})], ":1: 'input_ids' must be a non-empty list"),
        ([json.dumps({"input_ids": [1], "response_ids": [3, 128]})], ":1: 'response_ids' holds 128"),
        ([json.dumps({"input_ids": [1] * 40, "response_ids": [2] * 30})], ":1: prompt + response is 70 tokens"),
    ],
)
def test_cli_train_drafter_rejects_bad_rows(hf_dir, tmp_path, capsys, lines, message):
    data = tmp_path / "samples.jsonl"
    data.write_text("\n".join(lines) + "\n")
    rc = cli_main(["train-drafter", "--model", str(hf_dir), "--data", str(data), "--out", str(tmp_path / "d"), "--steps", "1"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_train_drafter_rejects_a_negative_ttt_hidden_weight(hf_dir, tmp_path, capsys):
    data = tmp_path / "samples.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2], "response_ids": [3, 4]}) + "\n")
    rc = cli_main(["train-drafter", "--model", str(hf_dir), "--data", str(data), "--out", str(tmp_path / "d"), "--steps", "1",
                   "--ttt-hidden-weight", "-1"])
    assert rc == 2
    assert "--ttt-hidden-weight >= 0" in capsys.readouterr().err and not (tmp_path / "d").exists()
