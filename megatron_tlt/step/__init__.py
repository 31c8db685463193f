"""The RL step's stages and the run around them (set-up, warm-up, evaluation, TLT, run checkpoints); the
driver `megatron_tlt/train.py` calls them in order. Named `step`, not pipeline: that word is pipeline parallelism."""
