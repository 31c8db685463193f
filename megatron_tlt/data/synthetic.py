"""Built-in synthetic tasks that need no download: prompts with verifiable answers.

`arithmetic_task(n, seed)` makes sums of a few small integers, written out step by step, so the
length of a worked answer grows with the number of terms (a long-tailed mix when the term count
is drawn from a skewed distribution).

    for ex in arithmetic_task(4, seed=0): print(ex.prompt, "->", ex.solution)
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class TaskExample:
    prompt: str  # the question
    answer: str  # the final answer a verifier checks
    solution: str  # a worked solution ending in the answer (for supervised warm-up)


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
