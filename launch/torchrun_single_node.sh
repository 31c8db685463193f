#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes on CPU/gloo):
#   launch/torchrun_single_node.sh CONFIG.yaml [key=value ...]
#   NPROC=2 launch/torchrun_single_node.sh examples/configs/tiny.yaml parallel.tensor_parallel_size=2
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [key=value ...]}
shift
nproc=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --standalone --nproc-per-node "$nproc" --no-python megatron-tlt train "$config" "$@"
