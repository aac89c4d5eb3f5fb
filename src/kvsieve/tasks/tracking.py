"""RULER's variable tracking: follow chains of ``VAR X = VAR Y`` assignments hidden in noise."""

from __future__ import annotations

import itertools
import random
import string

from kvsieve.tasks.base import HaystackTask, Needles, draw_fresh
from kvsieve.tasks.haystack import HaystackIndex

__all__ = ["VariableTrackingTask"]


class VariableTrackingTask(HaystackTask):
    """``VAR ABCDE = 12345.`` then ``VAR FGHIJ = VAR ABCDE.`` ...: name every variable holding the value.

    RULER's defaults: one chain of four hops (five variables) in the repeated-sentence noise; further chains
    (``num_chains``) are distractors with other values. The statements keep their chain order and sit at
    depths drawn from the seed; the ``depth`` argument does not apply.
    """

    name = "variable_tracking"
    description = "Variable tracking (RULER): find every variable a chain of assignments gives one value."
    max_new_tokens = 30
    default_haystack = "noise"
    uses_depth = False
    prefix = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"

    def __init__(self, num_chains: int = 1, num_hops: int = 4) -> None:
        if num_chains < 1 or num_hops < 1:
            raise ValueError("num_chains and num_hops must be at least 1")
        self.num_chains = num_chains
        self.num_hops = num_hops

    def draw(self, rng: random.Random, depth: float | None, index: HaystackIndex) -> Needles:
        taken: set[str] = set()
        avoid = self.prefix + " VAR Question Answer"

        def name(r: random.Random) -> str:
            return "".join(r.choices(string.ascii_uppercase, k=5))

        def number(r: random.Random) -> str:
            return str(r.randint(10000, 99999))

        chains = [
            [draw_fresh(rng, name, index, taken, avoid=avoid) for _ in range(self.num_hops + 1)]
            for _ in range(self.num_chains)
        ]
        values = [draw_fresh(rng, number, index, taken, avoid=avoid) for _ in chains]
        needles: list[tuple[str, float]] = []
        for chain, value in zip(chains, values, strict=True):
            depths = sorted(rng.uniform(0.0, 100.0) for _ in chain)
            statements = [f"VAR {chain[0]} = {value}."]
            statements += [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)]
            needles += zip(statements, depths, strict=True)
        answers, value = chains[0], values[0]
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        answer_prefix = (
            f"Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(answers)} variables are assigned the value {value}, they are:"
        )
        expected = {v: 1 for v in values}
        for chain in chains:
            expected |= {var: 2 for var in chain[:-1]} | {chain[-1]: 1}
        return Needles(
            prefix=self.prefix,
            needles=needles,
            question=question,
            answers=list(answers),
            answer_prefix=answer_prefix,
            expected={a: expected[a] for a in answers} | expected,
            meta={"chains": chains, "values": values},
        )
