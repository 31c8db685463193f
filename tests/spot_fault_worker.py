"""One rank of the dead-peer test (tests/test_faults.py): spot training with a PeerWatchdog; the victim rank
SIGKILLs itself while the survivor trains the drafter (or waits, with an empty buffer).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p LOCAL_RANK=r python tests/spot_fault_worker.py VICTIM MODE TIMEOUT_S
"""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from megatron_tlt.config.schema import ModelConfig
from megatron_tlt.coordinator.spot import PeerWatchdog, SpotTrainer
from megatron_tlt.drafter import Drafter
from megatron_tlt.drafter.data import DrafterBuffer, policy_examples
from megatron_tlt.drafter.trainer import DrafterTrainer
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import init_parallel, set_seed

victim, mode, timeout_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
torch.set_num_threads(1)
ps = init_parallel()
watchdog = PeerWatchdog(ps.rank, ps.world_size, timeout_s).start()
set_seed(0)
policy = Policy(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_attention_heads=4,
                            num_kv_heads=2, max_position_embeddings=64), ps.tp_group)
trainer = DrafterTrainer(Drafter(policy), lr=1e-3, max_tokens_per_micro_batch=48)
buffer = DrafterBuffer(max_bytes=2**20)
if mode == "train":
    gen = torch.Generator().manual_seed(ps.rank)
    buffer.add(0, policy_examples(policy, [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (12, 20, 9, 16)], 64))
spot = SpotTrainer(trainer, buffer, ps)
dist.barrier()
if ps.rank == victim:
    time.sleep(1.0)  # the survivor is in spot training by now
    print(f"victim rank {ps.rank} killed at {time.time():.3f}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
print(f"rank {ps.rank} spot training", flush=True)
spot.spot_train(0)  # the victim never finishes its rollout: only the watchdog ends this
print("spot training returned: the dead peer was not detected", flush=True)
sys.exit(0)
