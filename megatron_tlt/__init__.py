"""megatron_tlt: Megatron-style RL training for reasoning LLMs with a drafter trained on idle ranks (TLT)."""
__version__ = "0.1.0"
