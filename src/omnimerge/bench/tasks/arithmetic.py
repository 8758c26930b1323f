"""Arithmetic (text only): multi-step integer arithmetic, the text LLM's task in backbone merging."""

from __future__ import annotations

import random

from .core import TEXT, Draft, Item, Task, pick, register

TEMPLATES = {
    "chain3": ("What is {expr}?", "Compute {expr}.", "Calculate {expr}."),
    "chain4": ("What is {expr}?", "Compute {expr}.", "Calculate {expr}."),
    "paren": ("What is {expr}?", "Compute {expr}.", "Calculate {expr}."),
}


def _chain(rng: random.Random, k: int) -> tuple[str, int]:
    while True:
        nums = [rng.randint(1, 9) for _ in range(k)]
        ops = [rng.choice("+-") for _ in range(k - 1)]
        acc, ok = nums[0], True
        for op, v in zip(ops, nums[1:]):
            acc = acc + v if op == "+" else acc - v
            ok &= acc >= 0
        if ok:
            expr = str(nums[0]) + "".join(f" {op} {v}" for op, v in zip(ops, nums[1:]))
            return expr, acc


def sample(rng: random.Random, S: int) -> Draft:
    # chains of single digits and a bracketed product: multi-step, and learnable by the tiny model in
    # minutes (a times table to memorise, "a * b + c", was not: 9 % after 1250 steps)
    qtype = rng.choice(("chain3", "chain4", "paren"))
    if qtype == "chain3":
        expr, value = _chain(rng, 3)
    elif qtype == "chain4":
        expr, value = _chain(rng, 4)
    else:
        while True:
            a, b, c, form = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 5), rng.randrange(4)
            op = "+" if form < 2 else "-"
            value = (a + b if op == "+" else a - b) * c
            expr = f"({a} {op} {b}) * {c}" if form % 2 == 0 else f"{c} * ({a} {op} {b})"
            if a - b > 0 or op == "+":
                break
    tpl = TEMPLATES[qtype]
    ti = pick(rng, tpl)
    question, answer = tpl[ti].format(expr=expr), str(value)
    meta = {"kind": "expression", "expression": expr, "value": value, "qtype": qtype, "template": ti}
    return Draft(expr, question, lambda: Item("arithmetic", question, answer, None, meta))


TASK = register(Task("arithmetic", 5, TEXT, TEMPLATES, sample))
