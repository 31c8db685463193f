"""Speculative decoding for the rollout engine: a drafter proposes tokens, the target verifies them so that
the emitted tokens are exactly plain decoding's samples.

- `tree.py`: the maths, pure tensor functions: EAGLE-2 draft trees (`TreeBuilder`), exact-sample
  verification of chains and trees (`verify`), which verified K/V to keep (`kv_keep_index`);
- `drafting.py`: one speculative decode step over the live rows: the drafter kept fed without
  re-prefill (`DrafterState`), drafting (`draft_tree`), one-forward verification (`verify_tree`);
  its model calls go through `rollout.model_calls`;
- `selector.py`: draft shapes (`DraftShape`) and the adaptive bandit that picks one, or plain
  decoding, per live batch size (`DraftSelector`).

The engine (`rollout/engine.py`) decides which steps speculate; nothing here imports it.
"""
