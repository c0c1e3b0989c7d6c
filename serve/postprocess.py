"""Where model output becomes an answer: one image's output split into what it means, its
probabilities ranked into classes, and the verdict on whether the top class is an answer.

`answer` puts those together once; every route takes its `Answer` and only formats it its own
way (/predict as objects, /v2 as Triton's classification strings and tensors, the batch command
as rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .manifest import Acceptance


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


@dataclass(frozen=True)
class Output:
    """One image's model output: its class probabilities, and how familiar the photo looks to the
    model (the cosine of its features to the nearest class's training photos; None when the
    module does not report it)."""

    probabilities: torch.Tensor
    familiarity: float | None = None


def split_row(row: torch.Tensor, classes: int, extra_outputs: list[str]) -> Output:
    """An output row (serve/inference.py's output_rows) back into its parts."""
    extras = dict(zip(extra_outputs, row[classes:].tolist()))
    return Output(row[:classes], extras.get("familiarity"))


@dataclass(frozen=True)
class Verdict:
    accepted: bool | None  # None: no threshold to judge by
    reason: str | None = None


def judge(output: Output, acceptance: Acceptance | None, labels: list[str],
          min_probability: float | None = None) -> Verdict:
    """Whether the top class counts as an answer: the photo is familiar enough (when the model
    says how familiar) and its top probability reaches the threshold, `min_probability` if given,
    else the export's. A model exported with no threshold, asked without one, is not judged."""
    threshold = min_probability if min_probability is not None else (acceptance.min_probability if acceptance
                                                                      else None)
    if threshold is None:
        return Verdict(None)
    probability, index = (float(v) for v in output.probabilities.max(dim=0))
    closest = labels[int(index)]
    gate = acceptance.min_familiarity if acceptance is not None else None
    if gate is not None and output.familiarity is not None and output.familiarity < gate:
        return Verdict(False, f"this does not look like the car photos I know; closest: {closest}")
    if probability < threshold:
        return Verdict(False, f"not one of the {len(labels)} models I know; closest: {closest}")
    return Verdict(True)


@dataclass(frozen=True)
class Answer:
    """What one image's output row means: its `output`, its `k` most likely classes and the
    verdict on the top one."""

    output: Output
    ranked: list[Ranked]
    verdict: Verdict

    @property
    def probabilities(self) -> torch.Tensor:
        return self.output.probabilities

    def predictions(self) -> list[dict]:
        """/predict's and the batch rows' form: label and probability (six decimals) for the top k."""
        return [{"label": r.label, "probability": round(r.probability, 6)} for r in self.ranked]


def answer(row: torch.Tensor, labels: list[str], extra_outputs: list[str], acceptance: Acceptance | None, k: int,
           min_probability: float | None = None) -> Answer:
    """One image's output row made an answer: split, ranked to `k` classes and judged."""
    output = split_row(row, len(labels), extra_outputs)
    return Answer(output, rank(output.probabilities, labels, k), judge(output, acceptance, labels, min_probability))
