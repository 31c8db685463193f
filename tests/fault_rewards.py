"""Reward functions that misbehave on every call, for the fault tests (loaded by import path in pool workers)."""
import os
import time


def sleeps(response, example):
    time.sleep(600)
    return 1.0


def raises(response, example):
    raise ValueError("this reward always raises")


def exits(response, example):
    os._exit(7)


def returns_inf(response, example):
    return float("inf")


def correct(response, example):
    return 1.0


def hangs_on_node_1(response, example):
    """Hangs node 1's scoring once the file $MEGATRON_TLT_TEST_HANG exists (touching FILE.hanging first), so
    node 0's rank spends that time in spot training; 1.0 for an even length otherwise (groups keep some signal)."""
    marker = os.environ.get("MEGATRON_TLT_TEST_HANG")
    if os.environ.get("NODE_RANK") == "1" and marker and os.path.exists(marker):  # our env, not torchrun's rank
        open(marker + ".hanging", "w").close()
        time.sleep(600)
    return float(len(response) % 2 == 0)
