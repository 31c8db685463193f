#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR / MASTER_PORT / NNODES and its own NODE_RANK.
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 launch/torchrun_multi_node.sh CONFIG.yaml [key=value ...]
# TP groups are kept inside a node (TP is the innermost dimension of the rank layout).
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [key=value ...]}
shift
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
nproc=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-megatron_tlt}" \
    --no-python megatron-tlt train "$config" "$@"
