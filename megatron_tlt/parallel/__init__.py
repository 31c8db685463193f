from megatron_tlt.parallel.state import ParallelState, destroy_parallel, get_parallel_state, init_parallel, set_seed

__all__ = ["ParallelState", "destroy_parallel", "get_parallel_state", "init_parallel", "set_seed"]
