"""Reward functions that tests load by import path and run in RewardPool worker processes."""
import os
import time

NOT_CALLABLE = 42


def length_reward(response, example):
    return float(len(response))


def raise_on_bad(response, example):
    if response == "bad":
        raise ValueError("bad response")
    return 1.0


def sleep_on_slow(response, example):
    if response == "slow":
        time.sleep(60)
    return 1.0


def exit_on_crash(response, example):
    if response == "crash":
        os._exit(3)
    return 1.0


def nan_reward(response, example):
    return float("nan")


def length_parity(response, example):
    """1.0 for an even number of characters: often equal within a group of 2 (dynamic-sampling tests)."""
    return float(len(response) % 2 == 0)
