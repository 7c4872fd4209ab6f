"""Scores of a generated token sequence against a target: exact match, token accuracy, LCS ratio.

Plain Python on lists of ids, so anything that yields ids (tensors via `.tolist()`) can use them.
"""

from __future__ import annotations

from typing import Sequence


def exact_match(output: Sequence[int], target: Sequence[int]) -> bool:
    """True when the output starts with the whole target (generation may run past it)."""
    return len(output) >= len(target) and list(output[: len(target)]) == list(target)


def token_accuracy(output: Sequence[int], target: Sequence[int]) -> float:
    """Fraction of target positions where the output has the same token; 1.0 for an empty target."""
    if not target:
        return 1.0
    hits = sum(1 for a, b in zip(output, target) if a == b)
    return hits / len(target)


def lcs_ratio(output: Sequence[int], target: Sequence[int]) -> float:
    """Length of the longest common subsequence of output[:len(target)] and target, over len(target)."""
    if not target:
        return 1.0
    output = list(output[: len(target)])
    # One row of the classic dynamic programme, O(len(output) * len(target)) time.
    previous = [0] * (len(target) + 1)
    for a in output:
        current = [0]
        for j, b in enumerate(target):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(target)
