"""megatron_tlt: Megatron-style RL training for reasoning LLMs with a drafter trained on idle ranks (TLT).

    import megatron_tlt
    model = megatron_tlt.load_model(path)   # HF model directory or megatron_tlt checkpoint -> Policy

`import megatron_tlt` stays light: `load_model` (torch, megatron-core) is imported on first use.
"""
__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from megatron_tlt.checkpoint.loading import load_model

        return load_model
    raise AttributeError(f"module 'megatron_tlt' has no attribute {name!r}")
