"""`Sample`: one response to one prompt, the contract between rollout, rewards, advantages and the trainer.

Neither the engine nor the trainer owns it: the RL step builds Samples from the engine's completions,
and each later stage returns new Samples (`dataclasses.replace`) instead of editing them in place.

Token windows (the one place they are defined). A sample's sequence is `tokens = prompt + response`
(length L = P + R). Position t's logits (and final hidden state) predict tokens[t + 1], so response
token j is produced at position `response_start + j` with `response_start = P - 1`:

    positions     0 ... P-2 | P-1 ... L-2 | L-1
    predicts      prompt    | response    | nothing (the sequence's end)

`at_response_positions(values)` spreads one value per response token over the L positions (the
trainer's per-position rollout logprobs); `response_window` (P-1 .. L-1, R + 1 positions) is the
span a drafter example takes from the update's hidden states, with `tokens[response_window]`.
"""
from __future__ import annotations

from dataclasses import dataclass

FINISH_REASONS = ("stop", "length", "prompt_too_long")  # the rollout engine's `Completion.finish_reason`s


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # the sampling policy's logprob of each response token
    reward: float = 0.0
    advantage: float = 0.0
    group: int = 0  # samples of the same prompt share a group (the prompt's global id in its step)
    finish_reason: str = "stop"  # one of FINISH_REASONS
    trained: bool = True  # False: the sample takes no loss (e.g. a masked overlong response)
    policy_version: int = 0  # optimizer steps the sampling policy had taken (its weight version)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def response_start(self) -> int:
        """The position whose logits produce response token 0."""
        return len(self.prompt_ids) - 1

    @property
    def response_window(self) -> slice:
        """Positions response_start .. end of the sequence: the R + 1 positions from the one that produces
        the first response token to the last token."""
        return slice(self.response_start, len(self.prompt_ids) + len(self.response_ids))

    def at_response_positions(self, values: list[float], fill: float = 0.0) -> list[float]:
        """[L] `values` (one per response token) at the positions that produce them, `fill` elsewhere."""
        if len(values) != len(self.response_ids):
            raise ValueError(f"{len(values)} values for {len(self.response_ids)} response tokens")
        return [fill] * self.response_start + list(values) + [fill]
