"""The drafter: an EAGLE-style head that proposes tokens for speculative decoding (see `model.py`)."""
from megatron_tlt.drafter.model import Drafter

__all__ = ["Drafter"]
