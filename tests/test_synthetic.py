"""Built-in synthetic tasks: deterministic, verified by their own rewards, and long-tailed."""
import pytest

from megatron_tlt.data.synthetic import TASKS, arithmetic_task, countdown_task, get_task
from megatron_tlt.errors import UserError
from megatron_tlt.rl.rewards import resolve_reward
from megatron_tlt.rl.verifiers import countdown_value

TASK_REWARD = {"arithmetic": "math", "countdown": "countdown"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_per_seed(name):
    make = get_task(name)
    assert make(50, seed=3) == make(50, seed=3)
    assert make(50, seed=3) != make(50, seed=4)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_solutions_earn_full_reward(name):
    reward = resolve_reward(TASK_REWARD[name])
    for ex in get_task(name)(300, seed=0):
        assert reward(ex.solution, ex.to_dict()) == 1.0, ex


def test_wrong_answers_earn_nothing():
    ex = arithmetic_task(1, seed=0)[0]
    assert resolve_reward("math")(f"#{int(ex.answer) + 1}", ex.to_dict()) == 0.0
    ex = countdown_task(1, seed=0)[0]
    assert resolve_reward("countdown")(f"#{ex.answer}+1", ex.to_dict()) == 0.0


def test_countdown_answer_uses_every_number_once():
    for ex in countdown_task(200, seed=1):
        value, used = countdown_value(ex.answer)
        assert value == ex.meta["target"]
        assert sorted(used) == sorted(ex.meta["numbers"])
        assert all(str(n) in ex.prompt for n in ex.meta["numbers"]) and str(ex.meta["target"]) in ex.prompt


def test_countdown_solution_lengths_are_long_tailed():
    lengths = sorted(len(ex.solution) for ex in countdown_task(1000, seed=0))
    p50, p90 = lengths[len(lengths) // 2], lengths[int(0.9 * len(lengths))]
    assert p90 / p50 > 2.0
    assert lengths[-1] / p50 > 8.0


def test_unknown_task_lists_known_names():
    with pytest.raises(UserError, match="arithmetic, countdown"):
        get_task("sudoku")


def test_countdown_lengths_follow_the_prompt_with_attempts_per_number():
    """Default: the attempt count is drawn per solution (same numbers count, very different lengths); with
    attempts_per_number it follows from the prompt's number count (the scheduler's predictable workload)."""
    def attempts(ex):
        return sum("(not " in line for line in ex.solution.splitlines())

    for a in (0, 6):
        by_k: dict[int, list[int]] = {}
        for ex in countdown_task(2000, seed=0, attempts_per_number=a):
            by_k.setdefault(len(ex.meta["numbers"]), []).append(attempts(ex))
        assert sorted(by_k) == [3, 4, 5, 6]
        if a:
            for k, counts in by_k.items():  # a per number beyond 3, plus 0 .. a // 2 (failed subsets can be empty)
                assert max(counts) <= a * (k - 3) + a // 2 and sum(counts) / len(counts) >= a * (k - 3) * 0.8, (k, counts[:20])
        else:
            assert max(by_k[3]) >= 10 and sum(c == 0 for c in by_k[3]) > len(by_k[3]) / 3  # heavy-tailed at any k
    lengths = sorted(len(ex.solution) for ex in countdown_task(1000, seed=0, attempts_per_number=6))
    assert lengths[int(0.9 * len(lengths))] / lengths[len(lengths) // 2] > 2.0  # still long-tailed, over prompts
