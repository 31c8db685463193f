"""The memory plan: the bytes one rank holds in training and in rollouts, per pipeline stage, and whether it fits.

`memory_plan(cfg, world_size, group)` builds every pipeline rank's model chunks, the whole rollout model
and the drafter on the `meta` device (shapes and dtypes, no memory, no weights) at TP = 1 over `group` (a
process group of one), and takes each rank's shard of a tensor as megatron-core marks it: a
TP-sharded parameter (`parallel.sharding.partition_dim`) has that dimension divided by the TP degree,
everything else is replicated (`local_shapes`; tests/test_plan.py checks it against a real TP = 2 build).

What a rank holds, per pipeline rank (each is a distinct kind of rank: TP and DP peers hold the same bytes):

- weights, gradients: this rank's parameters at the params dtype; gradients the same (the trainer frees them
  at the start of the next update, so they are alive during rollouts too).
- optimizer: torch AdamW's state of the parameters this rank updates: two moments at the parameter's dtype
  and a 4-byte fp32 `step` per tensor. With `optim.distributed` that is the parameters
  `ZeroRedundancyOptimizer` gives this DP rank (whole tensors, largest first to the rank with the fewest
  elements; the plan counts the fullest rank). No fp32 master copy exists (`trainer.optimizer`).
- rollback: with `optim.rollback`, the copy of every local parameter and of this rank's optimizer state
  taken around `optimizer.step()`. The step itself (torch AdamW's foreach path, its default on CUDA) holds
  sqrt(exp_avg_sq) of every tensor it updates at once: one moment's bytes more, while no activations are alive.
- activations: what autograd keeps for backward over one packed micro-batch of `optim.micro_batch_tokens`
  tokens, counted from the code of `models.transformer` (per token and decoder layer; e = activation bytes,
  the params dtype; h, q, kv, i, n: hidden, local q / kv widths, local intermediate size and heads):
      two RMSNorms      2 * (4h + e h + 4)       fp32 input, normed (e), rsqrt
      their outputs     2 * e h                  saved by the q/k/v and gate/up linears
      attention         e (3q + 2kv) + 4n        q, k after RoPE, v, the core's output twice, its logsumexp
      MLP               4 e i                    gate, silu(gate), up, their product
  `optim.recompute=selective` recomputes the attention core and the MLP activation (drops the core's own
  output and logsumexp, e q + 4n, and silu(gate), e i); `full` recomputes whole decoder layers (every
  `optim.recompute_every`-th layer keeps only its input, e h, and one layer is rebuilt during backward).
  `parallel.sequence_parallel` divides the h terms by TP. Plus, per micro-batch, the RoPE tables (2 e D),
  the token ids on the first stage (8), the final norm, the logprob head (int64 targets, fp32
  logsumexp / entropy terms, ~8 fp32 loss terms) on the last stage and the received hidden input (e H)
  on the others; at PP > 1 with an online EAGLE-3 drafter the stages pass its three feature slots along
  (e 3H more received, and sent by every chunk but the last). A pipeline rank holds `in_flight` micro-batches
  of its chunks at once: pp - rank with 1F1B, (pp - rank - 1) * 2 + (vpp - 1) * pp + 1 chunk micro-batches
  with interleaving. Backward adds the largest transient: at the head, the fp32 weight-gradient accumulator [V/tp, H], four fp32 logit
  chunks [1024, V/tp] (two of a chunk and two of the previous one, still referenced; three when one chunk) and
  the hidden gradient; in a layer, the gradients of its input and output (its own gradients replace the
  saved tensors its backward frees), on top of the rebuilt layer with full recompute.
- KV cache: as many slots of `data.max_prompt_tokens + rollout.max_new_tokens` positions as fit in
  `rollout.kv_cache_gb`, at most `rollout.max_batch` (+ one padding slot for CUDA graphs). The engine allocates
  it once, so it is held in training too.
- rollout: the whole model at `rollout.tensor_parallel_size` (no pipeline stages), counted on top of the
  training weights when the layouts differ (PP > 1 or another TP): the trainer's weights stay. The response
  buffers (int64 token + fp32 logprob per slot and position) and the prefill of this rank's prompts (at
  most one per `rollout.n` slots, 8192 padded tokens a call; its largest live set: the residual, a norm and
  the MLP's three [tokens, I] tensors).
- FP8 rollout weights (`rollout.precision=fp8`): the quantized linears' e4m3 values and fp32 block scales at the
  rollout TP, on top of the high-precision copy (counted at its peak: the copy is quantized, then its linears freed).
- drafter: with speculative rollouts (`rollout.spec`), its weights at the rollout TP and its one-layer KV cache
  over the same slots; trained online (`drafter.online`), also its gradients, AdamW state and the full
  `drafter.buffer_gb` of (tokens, hidden states).

    plan = memory_plan(cfg, world_size=16, group=ps.tp_group)   # a group of one process
    for rank in plan.ranks: rank.training_bytes, rank.rollout_bytes
    print(format_plan(plan, device_gb=80))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch
import torch.distributed as dist
import torch.nn as nn

from megatron_tlt.config.dtypes import TORCH_DTYPES
from megatron_tlt.config.schema import Config, ModelConfig
from megatron_tlt.drafter.model import build_drafter
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel.layout import rank_stage_ids, stage_layer_ranges
from megatron_tlt.parallel.sharding import partition_dim
from megatron_tlt.rollout import QUANTIZED_LINEARS

GB = 2**30
LOGPROB_CHUNK = 1024  # tokens per logits chunk of ops.logprob.vocab_parallel_logprobs (its default)
PREFILL_TOKENS = 8192  # padded tokens per prefill call: RolloutEngine's max_prefill_tokens (build_engine's default)


@dataclass
class RankPlan:
    """The bytes of one pipeline rank (every TP / DP rank of that stage holds the same)."""

    pp_rank: int
    layers: list[tuple[int, int]]  # [first, last) of each model chunk
    weights: int
    grads: int
    optimizer: int
    rollback: int
    optimizer_step: int  # AdamW's foreach step (CUDA's default): sqrt(exp_avg_sq) of every owned tensor at once
    activations: int
    in_flight: int  # chunk micro-batches whose activations are alive at once
    rollout_weights: int  # the rollout layout's own copy (0 when it is the training layout)
    kv_cache: int  # the policy's KV cache (+ the drafter's with speculative rollouts)
    rollout_buffers: int  # response buffers + the prefill's live set
    fp8_weights: int  # rollout.precision=fp8: the linears' e4m3 weights + block scales at rollout TP (0 otherwise)
    drafter: int  # weights (+ grads, AdamW state and the buffer when trained online)
    extra: dict[str, int] = field(default_factory=dict)  # breakdown shown by format_plan

    @property
    def training_bytes(self) -> int:
        """Peak of the policy update: the state, then activations in backward or the rollback copy + the step's own."""
        return self.resident + max(self.activations, self.rollback + self.optimizer_step)

    @property
    def rollout_bytes(self) -> int:
        return self.resident + self.rollout_weights + self.fp8_weights + self.rollout_buffers

    @property
    def resident(self) -> int:
        """Held through both phases: the training state, the drafter and the KV caches (allocated once)."""
        return self.weights + self.grads + self.optimizer + self.drafter + self.kv_cache


@dataclass
class MemoryPlan:
    tp: int
    pp: int
    vpp: int
    dp: int
    rollout_tp: int
    world_size: int
    micro_batch_tokens: int
    recompute: str
    ranks: list[RankPlan]


def local_shapes(module: nn.Module, tp: int) -> dict[str, tuple[int, ...]]:
    """name -> this rank's shape of every parameter of a module built at TP = 1, at TP degree `tp`."""
    out = {}
    for name, p in module.named_parameters():
        shape, d = list(p.shape), partition_dim(p)
        if d is not None:
            if shape[d] % tp:
                raise ValueError(f"{name}: dimension {d} of {tuple(p.shape)} is not divisible by TP={tp}")
            shape[d] //= tp
        out[name] = tuple(shape)
    return out


def _param_bytes(module: nn.Module, tp: int) -> list[int]:
    """Bytes of each local parameter at TP degree `tp`, in `named_parameters` order."""
    sizes = {n: p.element_size() for n, p in module.named_parameters()}
    return [prod(shape) * sizes[n] for n, shape in local_shapes(module, tp).items()]


def _fp8_bytes(model: nn.Module, tp: int, block: int, reference: bool) -> int:
    """Bytes of the FP8 rollout weights (`rollout.fp8.Fp8Weights`) at TP degree `tp`: e4m3 values and fp32 block
    scales of each quantized linear's shard (+ its dequantized fp32 copy on the reference GEMM path)."""
    total = 0
    for name, shape in local_shapes(model, tp).items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in QUANTIZED_LINEARS:
            n, k = shape
            total += n * k * (5 if reference else 1) + 4 * -(-n // block) * -(-k // block)
    return total


def _adamw_bytes(param_bytes: list[int]) -> int:
    """torch AdamW's state: exp_avg and exp_avg_sq like the parameter, and a 0-dim fp32 step per tensor."""
    return sum(2 * b + 4 for b in param_bytes)


def zero_owned(param_bytes: list[int], elem: list[int], dp: int) -> list[int]:
    """Indices of the parameters ZeroRedundancyOptimizer gives its fullest rank: sorted by numel, largest first
    (a stable sort, as torch's), each to the first rank with the fewest elements so far."""
    numel = [b // e for b, e in zip(param_bytes, elem)]
    owned: list[list[int]] = [[] for _ in range(dp)]
    sizes = [0] * dp
    for i in sorted(range(len(numel)), key=lambda i: numel[i], reverse=True):
        r = sizes.index(min(sizes))
        owned[r].append(i)
        sizes[r] += numel[i]
    return owned[sizes.index(max(sizes))]


def layer_activation_bytes(m: ModelConfig, tp: int, sp: bool, e: int, recompute: str) -> int:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    h = m.hidden_size // tp if sp else m.hidden_size
    q, kv = m.num_attention_heads * m.head_dim // tp, m.num_kv_heads * m.head_dim // tp
    n, i = m.num_attention_heads // tp, m.intermediate_size // tp
    norms = 2 * (4 * h + e * h + 4) + 2 * e * h
    attention = e * (3 * q + 2 * kv) + 4 * n
    mlp = 4 * e * i
    if m.qk_norm:  # per-head RMSNorms of q and k: fp32 input, normed, rsqrt per head
        attention += (4 + e) * (q + kv) + 4 * (n + m.num_kv_heads // tp)
    if recompute == "selective":
        attention -= e * q + 4 * n
        mlp -= e * i
    return norms + attention + mlp


def _activations(cfg: Config, layers: list[tuple[int, int]], pp_rank: int, tp: int, e: int) -> tuple[int, int, dict]:
    """(bytes kept for backward + the backward transient, chunk micro-batches in flight, breakdown) of a
    pipeline rank over micro-batches of optim.micro_batch_tokens tokens."""
    m, o, p = cfg.model, cfg.optim, cfg.parallel
    T, H, pp, vpp = o.micro_batch_tokens, m.hidden_size, p.pipeline_parallel_size, p.virtual_pipeline_size
    sp = p.sequence_parallel and tp > 1
    per_layer = layer_activation_bytes(m, tp, sp, e, "none" if o.recompute == "full" else o.recompute)
    # an online EAGLE-3 drafter's target features ride with the activations between stages ([T, H + 3H])
    features = 3 * H if pp > 1 and cfg.rollout.spec != "off" and cfg.drafter.online and cfg.drafter.arch == "eagle3" else 0
    layer_input = e * (H // tp if sp else H)
    first, last = pp_rank == 0, pp_rank == pp - 1
    in_flight = pp - pp_rank if vpp == 1 else (pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1
    per_chunk = []  # bytes per token of each chunk's micro-batch
    for c, (a, b) in enumerate(layers):
        n = b - a
        kept = -(-n // o.recompute_every) if o.recompute == "full" else 0  # checkpointed layers: only their input
        chunk = kept * layer_input + (n - kept) * per_layer + 2 * e * m.head_dim
        if first and c == 0:
            chunk += 8  # token ids (the embedding's backward)
        else:
            chunk += e * (H + features)  # the hidden input received from the previous stage
        if last and c == len(layers) - 1:
            chunk += 4 * H + 2 * e * H + 4 + 8 + 8 + 8 * 4  # final norm + output, targets, lse, entropy, loss terms
        else:
            chunk += e * features  # the feature slots of the output sent on (its hidden part is the next layer input)
        per_chunk.append(chunk)
    # Chunk micro-batches in flight, shared evenly over the chunks (interleaving runs them round-robin).
    kept_bytes = T * in_flight * sum(per_chunk) // len(per_chunk)
    v_local = m.padded_vocab_size // tp
    logit_chunks = 4 if T > LOGPROB_CHUNK else 3  # two of this chunk and two of the previous one; one chunk: z, exp z, exp z * z
    head = 4 * v_local * H + logit_chunks * 4 * min(T, LOGPROB_CHUNK) * v_local + e * T * H if last else 0
    layer_bwd = T * e * 2 * H + (T * per_layer if o.recompute == "full" else 0)  # + the rebuilt layer
    transient = max(head, layer_bwd)
    return kept_bytes + transient, in_flight, {"activations kept": kept_bytes, "backward transient": transient}


def _build(cfg: ModelConfig, group, **kw) -> Policy:
    with torch.device("meta"):
        return Policy(cfg, group, init_weights=False, **kw)


def memory_plan(cfg: Config, world_size: int, group) -> MemoryPlan:
    """The per-rank bytes of `cfg` on `world_size` devices; `group` is a process group of one (the meta builds)."""
    if dist.get_world_size(group) != 1:
        raise ValueError("memory_plan builds at TP = 1 on meta: pass a process group of one process")
    m, p, o, r = cfg.model, cfg.parallel, cfg.optim, cfg.rollout
    tp, pp, vpp = p.tensor_parallel_size, p.pipeline_parallel_size, p.virtual_pipeline_size
    rtp = r.tensor_parallel_size or tp
    if world_size % (tp * pp) or world_size % rtp:
        raise ValueError(f"world size {world_size} is not divisible by TP x PP = {tp * pp} and rollout TP = {rtp}")
    dp = world_size // (tp * pp)
    e = TORCH_DTYPES[m.params_dtype].itemsize
    stages = stage_layer_ranges(m.num_layers, pp, vpp, p.pipeline_layout)

    whole = _build(m, group)
    separate = pp > 1 or rtp != tp
    rollout_weights = sum(_param_bytes(whole, rtp)) if separate else 0
    fp8 = _fp8_bytes(whole, rtp, r.fp8_block, r.fp8_gemm == "reference") if r.precision == "fp8" else 0
    seq = min(cfg.data.max_prompt_tokens + r.max_new_tokens, m.max_position_embeddings)
    kv_per_slot = 2 * m.num_layers * seq * (m.num_kv_heads // rtp) * m.head_dim * e
    slots = int(r.kv_cache_gb * GB) // kv_per_slot
    if slots < 1:
        raise ValueError(f"rollout.kv_cache_gb={r.kv_cache_gb} is below one KV slot of {seq} tokens ({kv_per_slot} B)")
    slots = min(slots, r.max_batch or slots)
    padded = slots + (r.cuda_graphs != "off")
    kv_cache = padded * kv_per_slot
    prompts = min(-(-cfg.run.prompts_per_step // (world_size // rtp)), max(slots // r.n, 1))
    prefill_tokens = min(prompts * cfg.data.max_prompt_tokens, max(PREFILL_TOKENS, cfg.data.max_prompt_tokens))
    prefill = prefill_tokens * (3 * e * m.intermediate_size // rtp + (4 + 2 * e) * m.hidden_size)
    buffers = slots * (r.max_new_tokens + 1) * (8 + 4) + prefill

    drafter = 0
    if r.spec != "off":
        with torch.device("meta"):
            d = _param_bytes(build_drafter(whole, cfg.drafter.arch, cfg.drafter.feature_layers, init_weights=False), rtp)
        online = sum(d) + _adamw_bytes(d) + int(cfg.drafter.buffer_gb * GB) if cfg.drafter.online else 0
        drafter = sum(d) + online
        kv_cache += padded * 2 * seq * (m.num_kv_heads // rtp) * m.head_dim * e

    ranks = []
    for pp_rank in range(pp):
        ids = rank_stage_ids(pp_rank, pp, vpp)
        layers = [stages[s] for s in ids]
        sizes, elems = [], []
        for s, (a, b) in zip(ids, layers):
            chunk = _build(m, group, layer_range=(a, b), pre_process=s == 0, post_process=s == pp * vpp - 1)
            sizes += _param_bytes(chunk, tp)
            elems += [q.element_size() for q in chunk.parameters()]
        owned = zero_owned(sizes, elems, dp) if o.distributed else range(len(sizes))
        optimizer = _adamw_bytes([sizes[i] for i in owned])
        step = sum(sizes[i] for i in owned)  # one moment: the moments are like the parameters
        weights = sum(sizes)
        activations, in_flight, extra = _activations(cfg, layers, pp_rank, tp, e)
        ranks.append(RankPlan(
            pp_rank=pp_rank, layers=layers, weights=weights, grads=weights, optimizer=optimizer,
            rollback=weights + optimizer if o.rollback else 0, optimizer_step=step, activations=activations, in_flight=in_flight,
            rollout_weights=rollout_weights, kv_cache=kv_cache, rollout_buffers=buffers, fp8_weights=fp8, drafter=drafter,
            extra=dict(extra, **{"KV slots": padded, "prefill": prefill}),
        ))
    return MemoryPlan(tp, pp, vpp, dp, rtp, world_size, o.micro_batch_tokens, o.recompute, ranks)


def _gb(n: int) -> str:
    return f"{n / GB:7.2f} GB"


def format_plan(plan: MemoryPlan, device_gb: float) -> str:
    """The plan as text: one block per pipeline rank, totals per phase and whether each fits `device_gb`."""
    limit = device_gb * GB
    lines = [f"TP {plan.tp} x PP {plan.pp} (vpp {plan.vpp}) x DP {plan.dp} = {plan.world_size} GPUs; rollout TP "
             f"{plan.rollout_tp}; micro-batch {plan.micro_batch_tokens} tokens, recompute {plan.recompute}; device {device_gb:g} GB"]
    for rk in plan.ranks:
        layers = ", ".join(f"{a}-{b - 1}" for a, b in rk.layers)
        lines.append(f"pipeline rank {rk.pp_rank} (layers {layers}; {rk.in_flight} chunk micro-batches in flight):")
        rows = [("weights", rk.weights), ("gradients", rk.grads), ("optimizer state", rk.optimizer),
                ("rollback copy", rk.rollback), ("optimizer step transient", rk.optimizer_step), ("activations", rk.activations),
                ("  kept for backward", rk.extra["activations kept"]), ("  backward transient", rk.extra["backward transient"]),
                ("rollout weights", rk.rollout_weights), (f"KV cache ({rk.extra['KV slots']} slots)", rk.kv_cache),
                ("rollout buffers + prefill", rk.rollout_buffers), ("FP8 rollout weights", rk.fp8_weights), ("drafter", rk.drafter)]
        lines += [f"  {name:<28}{_gb(n)}" for name, n in rows]
        for phase, n in (("training", rk.training_bytes), ("rollout", rk.rollout_bytes)):
            lines.append(f"  {phase + ' total':<28}{_gb(n)}  {'fits' if n <= limit else 'DOES NOT FIT'}")
    return "\n".join(lines)
