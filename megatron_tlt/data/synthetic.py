"""Built-in synthetic tasks that need no download: prompts with verifiable answers.

`arithmetic_task(n, seed)` makes sums of a few small integers, written out step by step, so the
length of a worked answer grows with the number of terms (a long-tailed mix when the term count
is drawn from a skewed distribution).

`countdown_task(n, seed)` gives a few numbers and a target reachable with + - * /; the worked
solution first shows a heavy-tailed number of failed attempts (as a search would), then the
derivation that works, so solution lengths have a real long tail (p90 is several times p50).
By default the attempt count is drawn per solution, so a prompt says nothing about its length;
with `attempts_per_number=a` it follows from the prompt (a per number beyond `min_numbers`, plus
0 .. a // 2 at random): prompts with more numbers are harder and take longer, as in reasoning RL,
where a prompt's earlier response lengths predict its next ones (the long-tail scheduler's premise).

Every worked solution ends with the final answer after the `#` marker ("... #9", "#(25+3)*7"),
which `megatron_tlt.rl.verifiers.extract_answer` reads. Rewards: "math" for arithmetic (checks
`answer`), "countdown" for countdown (checks the `numbers` and `target` in `meta`).

    for ex in get_task("countdown")(4, seed=0): print(ex.prompt, "->", ex.solution)
    row = ex.to_dict()   # {"prompt", "answer", "solution", **meta}: the `example` a reward sees
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from megatron_tlt.errors import UserError


@dataclass
class TaskExample:
    prompt: str  # the question
    answer: str  # the final answer a verifier checks
    solution: str  # a worked solution ending in the answer (for supervised warm-up)
    meta: dict[str, Any] = field(default_factory=dict)  # task fields a reward needs (countdown: numbers, target)

    def to_dict(self) -> dict[str, Any]:
        """The example as a flat row, as a reward function receives it."""
        return {"prompt": self.prompt, "answer": self.answer, "solution": self.solution, **self.meta}


def arithmetic_task(n: int, seed: int, max_terms: int = 6, max_value: int = 20) -> list[TaskExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        # Term counts are skewed: most problems are short, a few are long.
        k = min(max_terms, 2 + int(rng.expovariate(1.0)))
        terms = [rng.randint(0, max_value) for _ in range(k)]
        steps, acc = [], terms[0]
        for t in terms[1:]:
            steps.append(f"{acc}+{t}={acc + t}")
            acc += t
        out.append(TaskExample(prompt="+".join(map(str, terms)) + "=?", answer=str(acc), solution=" ".join(steps) + f" #{acc}"))
    return out


def _apply(op: str, a: int, b: int, max_result: int) -> Optional[int]:
    """a op b if it is a positive integer no larger than max_result, else None."""
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b > 1 and a % b == 0 else 0}[op]
    return result if 0 < result <= max_result else None


def _random_op(rng: random.Random, a: int, b: int, max_result: int) -> tuple[str, int]:
    """A random operator with a valid result on a >= b >= 1 (one always exists: +, else - or /, else 1*1)."""
    results = ((op, _apply(op, a, b, max_result)) for op in rng.sample("+-*/", 4))
    return next((op, value) for op, value in results if value is not None)


def _derivation(rng: random.Random, numbers: list[int], max_result: int) -> tuple[int, str, list[str]]:
    """Combine all `numbers` pairwise at random: (value, expression, one "a op b = c" line per step)."""
    items = [(v, str(v)) for v in numbers]  # (value, expression)
    steps = []
    while len(items) > 1:
        pair = [items.pop(rng.randrange(len(items))) for _ in range(2)]
        (a, expr_a), (b, expr_b) = sorted(pair, key=lambda item: -item[0])
        op, value = _random_op(rng, a, b, max_result)
        steps.append(f"{a}{op}{b}={value}")
        items.append((value, f"{_parenthesized(expr_a)}{op}{_parenthesized(expr_b)}"))
    value, expression = items[0]
    return value, expression, steps


def _parenthesized(expression: str) -> str:
    return expression if expression.isdigit() else f"({expression})"


def _failed_attempt(rng: random.Random, numbers: list[int], target: int, max_result: int) -> list[str]:
    """Steps of a derivation over a random subset of `numbers` that misses `target` (empty if none found)."""
    for _ in range(8):
        subset = rng.sample(numbers, rng.randint(2, len(numbers)))
        value, _, steps = _derivation(rng, subset, max_result)
        if value != target:
            steps[-1] += f" (not {target})"
            return steps
    return []


def countdown_task(
    n: int,
    seed: int,
    min_numbers: int = 3,
    max_numbers: int = 6,
    max_value: int = 25,
    max_result: int = 1000,
    max_attempts: int = 24,
    attempts_per_number: int = 0,
) -> list[TaskExample]:
    """Countdown problems: reach `target` from `numbers` with + - * / using each number at most once.

    The target is built from all numbers, so a solution always exists; intermediate results stay
    positive integers <= max_result. The count of failed attempts shown before the working
    derivation is Pareto-distributed (most solutions show none, a few show many); with
    `attempts_per_number` > 0 it is that many per number beyond `min_numbers`, plus 0 .. a // 2.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = min(max_numbers, min_numbers + int(rng.expovariate(1.0)))
        numbers = [rng.randint(1, max_value) for _ in range(k)]
        target, expression, steps = _derivation(rng, numbers, max_result)
        if attempts_per_number > 0:
            extra = attempts_per_number * (k - min_numbers) + rng.randint(0, attempts_per_number // 2)
        else:
            extra = int(rng.paretovariate(1.0)) - 1
        num_attempts = min(max_attempts, extra)
        attempts = [line for _ in range(num_attempts) for line in _failed_attempt(rng, numbers, target, max_result)]
        out.append(
            TaskExample(
                prompt=f"Using {' '.join(map(str, numbers))} and + - * / (each number at most once), make {target}.",
                answer=expression,
                solution="\n".join(attempts + steps + [f"#{expression}"]),
                meta={"numbers": numbers, "target": target},
            )
        )
    return out


TASKS: dict[str, Callable[..., list[TaskExample]]] = {"arithmetic": arithmetic_task, "countdown": countdown_task}


def get_task(name: str) -> Callable[..., list[TaskExample]]:
    """The task generator called `name`: `get_task("countdown")(n, seed)`."""
    if name not in TASKS:
        raise UserError(f"unknown synthetic task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
