"""The drafter: an EAGLE-style head that proposes tokens for speculative decoding, trained online by TLT.

    eagle3.py   `Eagle3Drafter` (drafter.arch=eagle3, the default): fused low / mid / high target features, servable
    model.py    `Drafter` (drafter.arch=eagle): one decoder layer on the policy's final hidden states; `build_drafter`
    loss.py     `drafter_loss`: EAGLE's hidden-state regression + soft cross-entropy on packed sequences;
                `ttt_loss`: EAGLE-3's training-time test
    data.py     `DrafterExample`, `DrafterBatch`, `make_batches`, `policy_examples`; the online `DrafterBuffer`
    trainer.py  `DrafterTrainer` (one preemptible step), `evaluate_drafter`, `train_drafter_offline`
"""
from megatron_tlt.drafter.data import (
    DrafterBatch,
    DrafterBuffer,
    DrafterExample,
    example_bytes,
    from_trainer_output,
    make_batches,
    policy_examples,
)
from megatron_tlt.drafter.eagle3 import Eagle3Drafter
from megatron_tlt.drafter.loss import CE_WEIGHT, HIDDEN_WEIGHT, VOCAB_CHUNK_TOKENS, drafter_loss, frozen, has_next_token, ttt_loss
from megatron_tlt.drafter.model import Drafter, build_drafter
from megatron_tlt.drafter.trainer import DrafterTrainer, evaluate_drafter, train_drafter_offline

__all__ = [
    "CE_WEIGHT",
    "HIDDEN_WEIGHT",
    "VOCAB_CHUNK_TOKENS",
    "Drafter",
    "DrafterBatch",
    "DrafterBuffer",
    "DrafterExample",
    "DrafterTrainer",
    "Eagle3Drafter",
    "build_drafter",
    "drafter_loss",
    "evaluate_drafter",
    "example_bytes",
    "from_trainer_output",
    "frozen",
    "has_next_token",
    "make_batches",
    "policy_examples",
    "train_drafter_offline",
    "ttt_loss",
]
