#!/usr/bin/env bash
# Several nodes: run the same command on every node (c10d rendezvous at MASTER_ADDR:MASTER_PORT).
#   MASTER_ADDR=node0 NNODES=2 launch/torchrun_multi_node.sh CONFIG.yaml [key=value ...]
# NNODES: nodes in the job; MASTER_ADDR: the host of the rendezvous store (any node, the same on all);
# MASTER_PORT (29500), RDZV_ID (megatron_tlt: a job's id, the same on all nodes), NPROC_PER_NODE (its GPUs, 1 on CPU).
# No node rank: c10d orders the nodes itself (torchrun ignores --node-rank unless the rendezvous is static),
# and the k-th node's processes get the consecutive global ranks k*NPROC_PER_NODE ... (k+1)*NPROC_PER_NODE-1.
#
# TP x PP x DP across nodes: TP is the innermost rank dimension, PP the outermost, so a TP group of at most
# NPROC_PER_NODE ranks sits on one node (a larger one logs a warning: its all-reduces cross the network) and
# pipeline stages span nodes. E.g. 2 nodes x 8 GPUs, TP within a node, PP across the two:
#   MASTER_ADDR=node0 NNODES=2 launch/torchrun_multi_node.sh CONFIG.yaml \
#       parallel.tensor_parallel_size=8 parallel.pipeline_parallel_size=2
# world = NNODES * NPROC_PER_NODE must be divisible by TP * PP (DP = world / (TP * PP)); else every rank
# stops at start naming the sizes.
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [key=value ...]}
shift
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the rendezvous node}"
: "${NNODES:?set NNODES}"
nproc=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --nnodes "$NNODES" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-megatron_tlt}" \
    --no-python megatron-tlt train "$config" "$@"
