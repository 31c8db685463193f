"""Verifiers (answer extraction, math equality, countdown), reward specs, and the reward process pool."""
import logging
import time

import pytest

from megatron_tlt.errors import UserError
from megatron_tlt.rl.rewards import RewardPool, RewardSpec, RewardStats, build_reward_fn, load_callable, resolve_reward
from megatron_tlt.rl.verifiers import countdown_reward, extract_answer, format_reward, math_equal, math_reward

MATH_EQUAL_CASES = [
    # integers, signs, thousands separators
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("1\\,000", "1000", True),
    ("-3", "-3.0", True),
    ("+7", "7", True),
    ("−4", "-4", True),  # unicode minus
    ("2", "-2", False),
    ("10", "100", False),
    ("1,2", "12", False),  # not a thousands separator
    # decimals
    ("0.50", "0.5", True),
    (".5", "0.5", True),
    ("0.5", "0.05", False),
    ("3.14", "3.141", False),
    # fractions
    ("1/2", "0.5", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac12", "1/2", True),
    ("\\tfrac{1}{2}", "\\frac{2}{4}", True),
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\frac{-3}{4}", "-0.75", True),
    ("1/2", "2", False),
    ("1/3", "0.333", False),  # exact comparison
    ("1/0", "0", False),
    ("\\frac{\\sqrt3}{2}", "\\dfrac{\\sqrt{3}}{2}", True),  # symbolic: normalised strings
    # wrappers, delimiters, LaTeX spacing
    ("$5$", "5", True),
    ("\\boxed{42}", "42", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("10.", "10", True),
    ("x = 5", "5", True),
    ("3 \\cdot 4", "3\\times4", True),
    ("{7}", "7", True),
    # units, degrees, currency, percentages (sign dropped: "50%" is 50, not 0.5)
    ("5\\text{ cm}", "5", True),
    ("12 \\mbox{ m}^2", "12", True),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("\\$18", "18", True),
    ("50\\%", "50", True),
    ("50%", "50", True),
    ("50\\%", "0.5", False),
    ("\\text{East}", "East", True),
    ("\\text{East}", "West", False),
    # tuples and intervals: element-wise, brackets must match
    ("(1, \\frac12)", "(1,0.5)", True),
    ("[0, 1)", "[0,1)", True),
    ("[0,1)", "(0,1)", False),
    ("(1,2)", "(2,1)", False),
    ("(1,2,3)", "(1,2)", False),
    # nothing to compare
    ("", "", False),
    (None, "5", False),
]


@pytest.mark.parametrize("pred,gold,expected", MATH_EQUAL_CASES)
def test_math_equal(pred, gold, expected):
    assert math_equal(pred, gold) is expected
    if pred is not None:
        assert math_equal(gold, pred) is expected  # symmetric


def test_verifiers_stay_fast_on_adversarial_inputs():
    t0 = time.perf_counter()
    assert math_equal("{" * 20000 + "1" + "}" * 20000, "1")  # nested wrappers are peeled in one pass
    assert not math_equal("1" * 5000, "1")  # too many digits for int(): compared as strings
    assert extract_answer("<answer>" * 20000) is None
    assert countdown_reward("#" + "(" * 20000, [1], 1) == 0.0
    assert time.perf_counter() - t0 < 5.0


EXTRACT_CASES = [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("first \\boxed{1}, then \\boxed{2}", "2"),  # last box wins
    ("\\boxed{\\boxed{3}}", "\\boxed{3}"),  # the outer box is the last top-level one
    ("\\fbox{7}", "7"),
    ("$\\boxed 9$", "9"),
    ("\\boxed{1} ... \\boxed{2", None),  # the last box never closes: truncated response
    ("\\boxed{5} but The answer is 6", "5"),  # a box beats markers
    ("<answer>25+3*7</answer>", "25+3*7"),
    ("Natalia sold 72 clips.\n#### 72", "72"),
    ("3+4=7 7+2=9 #9", "9"),
    ("#(25+3)*7", "(25+3)*7"),
    ("## Step 1\nadd them", None),  # a Markdown heading is not a marker
    ("The answer is 3.14. Done.", "3.14"),
    ("The final answer is $\\frac12$.", "$\\frac12$"),
    ("Answer: 12\nthen Answer: 13", "13"),  # last marker wins
    ("**Answer:** 5", "5"),
    ("I am not sure.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_math_and_format_reward():
    assert math_reward("12+30=42 #42", "42") == 1.0
    assert math_reward("so \\boxed{\\dfrac{1}{2}}", "0.5") == 1.0
    assert math_reward("\\boxed{41}", "42") == 0.0
    assert math_reward("42", "42") == 0.0  # no stated final answer
    assert format_reward("\\boxed{41}") == 1.0
    assert format_reward("41") == 0.0


COUNTDOWN_CASES = [
    ("#(25+3)*7", [3, 7, 25], 196, 1.0),
    ("\\boxed{(25 + 3) \\times 7}", [3, 7, 25], 196, 1.0),
    ("#(25+3)*7 = 196", [3, 7, 25], 196, 1.0),
    ("#25+3", [3, 7, 25], 28, 1.0),  # not all numbers need be used
    ("#(7/2)*4", [7, 2, 4], 14, 1.0),  # exact fractional intermediate
    ("#5*5", [5, 5, 3], 25, 1.0),  # a number given twice may be used twice
    ("#(25+3)*7 = 195", [3, 7, 25], 196, 0.0),  # claims the wrong result
    ("#(25+3)*7", [3, 7, 25], 195, 0.0),  # wrong target
    ("#7*7*4", [3, 7, 4], 196, 0.0),  # reuses a number
    ("#(25+4)*7", [3, 7, 25], 203, 0.0),  # uses a number not given
    ("#25/(3-3)", [3, 3, 25], 0, 0.0),  # division by zero
    ("#__import__('os')", [3], 3, 0.0),
    ("#x+3", [3], 3, 0.0),  # names
    ("#2**3", [2, 3], 8, 0.0),  # power
    ("#7//2", [7, 2], 3, 0.0),  # floor division
    ("#-3+10", [3, 10], 7, 0.0),  # unary minus
    ("#2.5*2", [2, 2], 5, 0.0),  # floats
    ("#0x19", [25], 25, 0.0),  # non-decimal literal
    ("#(" * 200 + "1" + ")" * 200, [1], 1, 0.0),  # too long to parse
    ("no answer", [3, 7, 25], 196, 0.0),
]


@pytest.mark.parametrize("response,numbers,target,expected", COUNTDOWN_CASES)
def test_countdown_reward(response, numbers, target, expected):
    assert countdown_reward(response, numbers, target) == expected


# --- specs ---------------------------------------------------------------------------------------


def test_weighted_sum_of_builtins():
    fn = build_reward_fn([{"name": "math", "weight": 1.0}, RewardSpec("format", 0.1)])
    assert fn("\\boxed{42}", {"prompt": "?", "answer": "42"}) == pytest.approx(1.1)
    assert fn("\\boxed{41}", {"prompt": "?", "answer": "42"}) == pytest.approx(0.1)
    countdown = resolve_reward("countdown")
    assert countdown("#(25+3)*7", {"prompt": "?", "answer": "", "numbers": [3, 7, 25], "target": 196}) == 1.0


@pytest.mark.parametrize("path", ["reward_fns_for_tests:length_reward", "reward_fns_for_tests.length_reward"])
def test_user_reward_by_import_path(path):
    assert resolve_reward(path)("abc", {}) == 3.0


@pytest.mark.parametrize(
    "specs,message",
    [
        ([], "no reward"),
        ([{"name": "mth"}], "unknown reward 'mth'"),
        ([{"name": "math", "wieght": 1.0}], "expected keys"),
        ([{"name": "no_such_module_xyz:fn"}], "cannot import module 'no_such_module_xyz'"),
        ([{"name": "reward_fns_for_tests:missing"}], "has no attribute 'missing'"),
        ([{"name": "reward_fns_for_tests:NOT_CALLABLE"}], "not callable"),
        ([{"name": "reward_fns_for_tests:"}], "expected an import path"),
    ],
)
def test_bad_reward_spec_is_a_user_error(specs, message):
    with pytest.raises(UserError, match=message):
        build_reward_fn(specs)


def test_load_callable_nested_attribute():
    assert load_callable("os.path:join")("a", "b") == "a/b"


# --- the pool ------------------------------------------------------------------------------------


def test_inline_pool_counts_errors():
    fn = load_callable("reward_fns_for_tests:raise_on_bad")
    with RewardPool(fn, num_workers=0) as pool:
        rewards, stats = pool.compute(["ok", "bad", "ok"], [{}] * 3)
    assert rewards == [1.0, 0.0, 1.0]
    assert (stats.num_calls, stats.num_errors, stats.num_timeouts) == (3, 1, 0)


def test_pool_returns_rewards_in_input_order():
    responses = ["x" * n for n in [5, 1, 9, 3, 0, 7, 2, 8]]
    fn = build_reward_fn([{"name": "reward_fns_for_tests:length_reward", "weight": 2.0}])
    with RewardPool(fn, num_workers=2, timeout_s=30.0) as pool:
        rewards, stats = pool.compute(responses, [{}] * len(responses))
        rewards_again, _ = pool.compute(responses[::-1], [{}] * len(responses))
        assert pool.stats.num_calls == 2 * len(responses)
    assert rewards == [2.0 * len(r) for r in responses]
    assert rewards_again == rewards[::-1]
    assert stats == RewardStats(len(responses), 0, 0, stats.time_s)


def test_pool_survives_errors_crashes_and_timeouts(caplog):
    fn = build_reward_fn(
        [
            {"name": "reward_fns_for_tests:raise_on_bad"},
            {"name": "reward_fns_for_tests:sleep_on_slow"},
            {"name": "reward_fns_for_tests:exit_on_crash"},
        ]
    )
    timeout_s = 1.0
    with RewardPool(fn, num_workers=2, timeout_s=timeout_s) as pool:
        pool.compute(["ok"], [{}])  # workers are up
        t0 = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="megatron_tlt.rl.rewards"):
            rewards, stats = pool.compute(["ok", "bad", "slow", "crash", "ok"], [{}] * 5)
        batch_s = time.perf_counter() - t0
        assert rewards == [3.0, 0.0, 0.0, 0.0, 3.0]
        assert (stats.num_calls, stats.num_errors, stats.num_timeouts) == (5, 2, 1)
        assert timeout_s <= batch_s < timeout_s + 10.0  # the sleeping call (60 s) was cut off
        failure_lines = [r.getMessage() for r in caplog.records if "calls failed" in r.getMessage()]
        assert len(failure_lines) == 1 and "ValueError: bad response" in failure_lines[0]

        t0 = time.perf_counter()
        rewards, stats = pool.compute(["ok"] * 4, [{}] * 4)  # the killed workers were replaced
        assert rewards == [3.0] * 4 and stats.num_errors == stats.num_timeouts == 0
        assert time.perf_counter() - t0 < 10.0


def test_pool_rejects_non_finite_rewards():
    with RewardPool(load_callable("reward_fns_for_tests:nan_reward"), num_workers=0) as pool:
        rewards, stats = pool.compute(["a"], [{}])
    assert rewards == [0.0] and stats.num_errors == 1


def test_pool_needs_picklable_function():
    with pytest.raises(UserError, match="module level"):
        RewardPool(lambda response, example: 1.0, num_workers=1)
