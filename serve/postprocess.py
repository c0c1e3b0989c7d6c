"""Where model output becomes an answer: one image's probabilities ranked into classes.

Every route ranks with `rank` and only formats the result its own way (/predict as objects,
/v2 as Triton's classification strings).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Ranked(NamedTuple):
    index: int
    label: str
    probability: float


def clamp_k(k: int, classes: int) -> int:
    """A requested number of classes, kept between 1 and the number the model has."""
    return max(1, min(k, classes))


def rank(probabilities: torch.Tensor, labels: list[str], k: int) -> list[Ranked]:
    """The k most likely classes of one image's probability row, most likely first."""
    values, indices = torch.topk(probabilities, clamp_k(k, len(labels)))
    return [Ranked(i, labels[i], p) for p, i in zip(values.tolist(), indices.tolist())]


def predictions(probabilities: torch.Tensor, labels: list[str], k: int) -> list[dict]:
    """/predict's form: label and probability (six decimals) for the top k."""
    return [{"label": r.label, "probability": round(r.probability, 6)} for r in rank(probabilities, labels, k)]
