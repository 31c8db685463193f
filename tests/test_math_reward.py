"""The math reward against a labelled table (no false positives, at least math-verify's accuracy), and its
cost on hostile inputs: bounded time, reward 0 and a counted timeout, in-process and through the pool."""
import signal
import threading
import time
from collections import Counter

import pytest
from math_reward_cases import CASES

from megatron_tlt.rl.rewards import RewardPool, build_reward_fn
from megatron_tlt.rl.verifiers import VerificationTimeout, final_answers, math_reward

RULES = {"extract", "hedge", "correction", "units", "percent", "exact", "equiv", "set", "tuple", "interval",
         "choice", "text", "plain", "wrong"}


def math_verify_alone(response: str, gold: str) -> float:
    """The baseline: math-verify as open-r1 / TRL use it (its default extraction and comparison)."""
    from math_verify import parse, verify

    return float(verify(parse("$" + gold + "$"), parse(response)))


def _score(fn, response, gold):
    try:
        return fn(response, gold)
    except VerificationTimeout:
        return 0.0


def test_table_no_false_positives_and_at_least_math_verify(capsys):
    assert len(CASES) >= 200 and {rule for rule, *_ in CASES} == RULES
    assert all(label in (0, 1) for *_, label in CASES)
    ours = [_score(math_reward, response, gold) for _, response, gold, _ in CASES]
    theirs = [_score(math_verify_alone, response, gold) for _, response, gold, _ in CASES]
    labels = [label for *_, label in CASES]
    false_positives = [case for case, o in zip(CASES, ours) if o == 1.0 and case[3] == 0]
    ours_right, theirs_right = Counter(), Counter()
    for (rule, *_), o, t, label in zip(CASES, ours, theirs, labels):
        ours_right[rule] += o == label
        theirs_right[rule] += t == label
    totals = Counter(rule for rule, *_ in CASES)
    with capsys.disabled():
        print(f"\nmath reward table: {len(CASES)} cases")
        print(f"  {'rule':<11}{'cases':>6}{'ours':>7}{'math-verify':>13}")
        for rule in sorted(totals):
            print(f"  {rule:<11}{totals[rule]:>6}{ours_right[rule]:>7}{theirs_right[rule]:>13}")
        acc_ours, acc_theirs = sum(ours_right.values()) / len(CASES), sum(theirs_right.values()) / len(CASES)
        print(f"  accuracy: ours {acc_ours:.1%}, math-verify alone {acc_theirs:.1%}")
        theirs_fp = sum(t == 1.0 and label == 0 for t, label in zip(theirs, labels))
        print(f"  false positives: ours {len(false_positives)}, math-verify alone {theirs_fp}")
        for case, o in zip(CASES, ours):
            if o != case[3]:
                print(f"  ours misses (label {case[3]}): {case[1]!r} vs gold {case[2]!r}")
    assert false_positives == []
    assert acc_ours >= acc_theirs


@pytest.mark.parametrize(
    "response,expected",
    [
        (r"either \boxed{3} or \boxed{4}", ["3", "4"]),
        (r"\boxed{4}, no wait, \boxed{5}", ["5"]),
        (r"first \boxed{1}, then \boxed{2}", ["2"]),
        (r"\boxed{1}, \boxed{2}, and \boxed{3}", ["1", "2", "3"]),
        ("The answer is 12 or 13.", ["12", "13"]),
        ("Final Answer: The final answer is $7$. I hope it is correct.", ["$7$"]),
        ("#### 72", ["72"]),
        (r"\boxed{1} ... \boxed{2", []),
        ("no answer", []),
    ],
)
def test_final_answers(response, expected):
    assert final_answers(response) == expected


# --- cost: hostile inputs end fast with reward 0 and a counted timeout -----------------------------

MB = 1_000_000
HOSTILE = {
    "1 MB of reasoning, then the box": ("Let me think. " * (MB // 14) + r"so \boxed{5}", "5", 1.0),
    "1 MB inside one box": (r"\boxed{" + "1+" * (MB // 2) + "1}", "2", "timeout"),
    "1 MB without an answer": ("x" * MB, "5", 0.0),
    "1 MB of braces": ("{" * (MB // 2) + "}" * (MB // 2), "5", 0.0),
    "1 MB of unclosed boxes": (r"\boxed{" * (MB // 7), "5", 0.0),
    "1 MB of dollars": ("$" * MB, "5", 0.0),
    "1 MB of answer markers": ("Answer: " * (MB // 8), "5", 0.0),
    "1 MB of one boxed answer": (r"\boxed{1}" * (MB // 9), "1", 1.0),
    "60,000 different boxed answers": ("".join(rf"\boxed{{{i}}}, " for i in range(60_000)), "1", 0.0),
    "power tower 10^{10^{10}}": (r"\boxed{10^{10^{10}}}", "1", "timeout"),
    "power tower as the gold": (r"\boxed{1}", "10^{10^{10}}", "timeout"),
    "huge exponent": (r"\boxed{2^{99999999}}", "1", "timeout"),
    "huge factorial": (r"\boxed{1000000!}", "1", "timeout"),
    "braces nested 200 deep": (r"\boxed{" + "{" * 200 + "1" + "}" * 200 + "+1}", "2", "timeout"),
    "fractions nested 100 deep": (r"\boxed{" + r"\frac{1}{" * 100 + "2" + "}" * 100 + "}", "1", "timeout"),
    "5000 digits": (r"\boxed{" + "9" * 5000 + "}", "1", "timeout"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_end_fast(name, capsys):
    response, gold, expected = HOSTILE[name]
    t0 = time.perf_counter()
    if expected == "timeout":
        with pytest.raises(VerificationTimeout):
            math_reward(response, gold)
    else:
        assert math_reward(response, gold) == expected
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n  {name}: {elapsed * 1000:.0f} ms ({expected})", end="")
    assert elapsed < 3.0


SLOW_SYMPY = (r"\boxed{(x+1)^{200}(x-1)^{200}}", "(x^2-1)^{200}")  # passes the guards; sympy takes ~6 s


def test_hostile_inputs_through_the_pool():
    """Refused inputs and a call killed at the pool's deadline both score 0 and count as timeouts."""
    names = [n for n in HOSTILE if HOSTILE[n][2] == "timeout"]
    responses = [r"\boxed{42}"] + [HOSTILE[n][0] for n in names] + [SLOW_SYMPY[0], r"so \boxed{\frac12}"]
    golds = ["42"] + [HOSTILE[n][1] for n in names] + [SLOW_SYMPY[1], "0.5"]
    timeout_s = 2.0
    with RewardPool(build_reward_fn([{"name": "math"}]), num_workers=2, timeout_s=timeout_s) as pool:
        pool.compute([r"\boxed{1}"], [{"answer": "1"}])  # workers are up
        t0 = time.perf_counter()
        rewards, stats = pool.compute(responses, [{"answer": g} for g in golds])
        batch_s = time.perf_counter() - t0
        assert rewards == [1.0] + [0.0] * (len(names) + 1) + [1.0]
        assert (stats.num_errors, stats.num_timeouts) == (0, len(names) + 1)
        assert timeout_s <= batch_s < timeout_s + 15.0  # the slow call was killed at its deadline
        rewards, stats = pool.compute([r"\boxed{7}"] * 4, [{"answer": "7"}] * 4)  # the killed worker was replaced
        assert rewards == [1.0] * 4 and stats.num_timeouts == 0


def test_inline_pool_counts_a_refused_input_as_a_timeout():
    with RewardPool(build_reward_fn([{"name": "math"}]), num_workers=0) as pool:
        rewards, stats = pool.compute([r"\boxed{10^{10^{10}}}", r"\boxed{3}"], [{"answer": "1"}, {"answer": "3"}])
    assert rewards == [0.0, 1.0] and (stats.num_errors, stats.num_timeouts) == (0, 1)


def test_math_verify_signal_timeouts_are_off():
    """math-verify's SIGALRM timeouts would reset a caller's alarm and fail outside the main thread."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.alarm(100)
        assert math_reward(r"\boxed{2x+2}", "2(x+1)") == 1.0  # parsed and compared by math-verify
        assert math_reward(r"\boxed{\sqrt{8}}", r"2\sqrt2") == 1.0
        assert signal.alarm(0) > 90  # our alarm is still armed: math-verify never called alarm()
        assert not fired
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

    results = []
    thread = threading.Thread(target=lambda: results.append(math_reward(r"\boxed{x^2-1}", "(x-1)(x+1)")))
    thread.start()
    thread.join(60)
    assert results == [1.0]
