"""Rank layout and process groups (`state`), TP layers (`tensor_parallel`), TP sharding of full tensors
(`sharding`) and gradient collectives (`grads`), on megatron-core's parallel_state and TP layers.

Importing megatron-core on a machine without Transformer Engine / Apex prints a UserWarning per module
that it falls back to torch implementations: harmless for us (we use none of those fused paths), so that
one message, from megatron.core only, is filtered here, before any of our modules imports megatron-core.
"""
import warnings

warnings.filterwarnings(
    "ignore", message="Transformer Engine and Apex are not installed", category=UserWarning, module=r"megatron\.core"
)

from megatron_tlt.parallel.state import ParallelState, destroy_parallel, get_parallel_state, init_parallel, set_seed  # noqa: E402

__all__ = ["ParallelState", "destroy_parallel", "get_parallel_state", "init_parallel", "set_seed"]
