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
