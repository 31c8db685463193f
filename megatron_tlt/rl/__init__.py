"""RL pieces: `rewards` (reward functions, process pool), `verifiers` (answer checking), `algorithms`
(advantages, losses, dynamic sampling).

Import the submodules directly. This file stays empty on purpose: reward worker processes import
`megatron_tlt.rl.rewards`, and must not pay for `algorithms`' torch import.
"""
