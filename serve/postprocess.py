"""Where model output becomes an answer: one image's output split into what it means, its
probabilities ranked into classes, summed into makes, and the verdict on what counts as an answer.

An answer names one model: the most likely model of the most likely make, so that the model
and the make it gives never disagree. That is the most likely class whenever one class holds
more than half the probability (every model-level answer in practice); short of that, a make
whose models share the probability wins over one model of another make, e.g. a pair of
Chevrolet vans at 0.30 and 0.25 over a GMC van at 0.35. On the default model's validation photos
this named the right make for 92.4 % of photos where the most likely class gave 91.7 %, and the
right model for 86.3 % where it gave 86.1 %.

`answer` puts those together once; every route takes its `Answer` and only formats it its own
way (/predict as objects, /v2 as Triton's classification strings and tensors, the batch command
as rows).

Acceptance has two levels. The model is named when its probability reaches the threshold;
otherwise, when the make's probability (the sum over that make's models) reaches the make
threshold, the answer is the make alone ("a Rolls-Royce; not sure which model"); otherwise the
photo is turned away. A photo that does not look like any car photo the model knows is turned
away at both levels. `accepted` stays true only at model level, as before makes existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .manifest import Acceptance, CarClass

MODEL, MAKE = "model", "make"


class Ranked(NamedTuple):
    index: int
    label: str
    probability: float


def clamp_k(k: int, classes: int) -> int:
    """A requested number of classes, kept between 1 and the number the model has."""
    return max(1, min(k, classes))


def rank(probabilities: torch.Tensor, labels: list[str], k: int, first: int | None = None) -> list[Ranked]:
    """The k most likely classes of one image's probability row, most likely first; with `first`
    (the class an answer names), that class leads and the rest follow by probability."""
    values, indices = torch.topk(probabilities, clamp_k(k, len(labels)))
    ranked = [Ranked(i, labels[i], p) for p, i in zip(values.tolist(), indices.tolist())]
    if first is None or ranked[0].index == first:
        return ranked
    lead = Ranked(first, labels[first], float(probabilities[first]))
    return [lead, *(r for r in ranked if r.index != first)][:len(ranked)]


@dataclass(frozen=True)
class Output:
    """One image's model output: its class probabilities, and how familiar the photo looks to the
    model (the cosine of its features to the nearest class's training photos; None when the
    module does not report it)."""

    probabilities: torch.Tensor
    familiarity: float | None = None


def split_row(row: torch.Tensor, classes: int, extra_outputs: list[str]) -> Output:
    """An output row (serve/scheduler.py's output_rows) back into its parts."""
    extras = dict(zip(extra_outputs, row[classes:].tolist()))
    return Output(row[:classes], extras.get("familiarity"))


class Makes:
    """The makes of a model's classes, and which make each output column belongs to."""

    def __init__(self, makes: list[str]):
        """`makes`: each output column's make, in column order."""
        self.names: list[str] = list(dict.fromkeys(makes))
        position = {name: i for i, name in enumerate(self.names)}
        self.index = torch.tensor([position[make] for make in makes], dtype=torch.long)

    @classmethod
    def of(cls, classes: list[CarClass]) -> Makes:
        return cls([c.make for c in classes])

    def probabilities(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Each make's probability, the sum over its models: [classes] -> [makes], or a batch of
        rows, [N, classes] -> [N, makes] (the export fits the make threshold on these)."""
        sums = probabilities.new_zeros(*probabilities.shape[:-1], len(self.names))
        return sums.index_add_(probabilities.dim() - 1, self.index, probabilities)

    def top(self, probabilities: torch.Tensor) -> Ranked:
        """The most likely make of one image's probability row."""
        probability, index = self.probabilities(probabilities).max(dim=0)
        return Ranked(int(index), self.names[int(index)], float(probability))


def named_classes(probabilities: torch.Tensor, makes: Makes | None) -> torch.Tensor:
    """The class an answer names, for one row ([classes] -> a 0-d index) or each row of a batch
    ([N, classes] -> [N]): the most likely model of the most likely make, or the most likely
    class when the classes carry no makes. The server and the export both name it here."""
    if makes is None:
        return probabilities.argmax(dim=-1)
    top_make = makes.probabilities(probabilities).argmax(dim=-1, keepdim=True)
    return probabilities.masked_fill(makes.index != top_make, -1.0).argmax(dim=-1)


def with_article(make: str) -> str:
    # "an Audi", "an AM General"; every make that starts with a vowel letter is said with one here.
    return f"{'an' if make[:1].upper() in 'AEIOU' else 'a'} {make}"


@dataclass(frozen=True)
class Verdict:
    accepted: bool | None  # None: no threshold to judge by
    reason: str | None = None
    level: str | None = None  # MODEL, MAKE, or None (turned away, or not judged)


def judge(output: Output, acceptance: Acceptance | None, labels: list[str],
          min_probability: float | None = None, make: Ranked | None = None, named: Ranked | None = None) -> Verdict:
    """Whether the named class (`named`, else the most likely) counts as an answer: the photo is
    familiar enough (when the model says how familiar) and the class's probability reaches the
    threshold, `min_probability` if given, else the export's. Short of that, `make` (the top make)
    is the answer when its probability reaches the export's make threshold. A model exported with
    no threshold, asked without one, is not judged."""
    threshold = min_probability if min_probability is not None else (acceptance.min_probability if acceptance
                                                                      else None)
    if threshold is None:
        return Verdict(None)
    if named is None:
        named = rank(output.probabilities, labels, 1)[0]
    probability, closest = named.probability, named.label
    gate = acceptance.min_familiarity if acceptance is not None else None
    if gate is not None and output.familiarity is not None and output.familiarity < gate:
        return Verdict(False, f"this does not look like the car photos I know; closest: {closest}")
    if probability >= threshold:
        return Verdict(True, level=MODEL)
    make_threshold = acceptance.min_make_probability if acceptance is not None else None
    if make is not None and make_threshold is not None and make.probability >= make_threshold:
        return Verdict(False, f"{with_article(make.label)}; not sure which model (closest: {closest})", MAKE)
    return Verdict(False, f"not one of the {len(labels)} models I know; closest: {closest}")


@dataclass(frozen=True)
class Answer:
    """What one image's output row means: its `output`, its `k` most likely classes, its most
    likely make (None when the model's classes carry no makes) and the verdict."""

    output: Output
    ranked: list[Ranked]
    verdict: Verdict
    make: Ranked | None = None

    @property
    def probabilities(self) -> torch.Tensor:
        return self.output.probabilities

    def predictions(self) -> list[dict]:
        """/predict's and the batch rows' form: label and probability (six decimals) for the top k."""
        return [{"label": r.label, "probability": round(r.probability, 6)} for r in self.ranked]

    def make_answer(self) -> dict | None:
        """/predict's "make": the most likely make and its probability (six decimals)."""
        return None if self.make is None else {"label": self.make.label, "probability": round(self.make.probability, 6)}


def answer(row: torch.Tensor, labels: list[str], extra_outputs: list[str], acceptance: Acceptance | None, k: int,
           min_probability: float | None = None, makes: Makes | None = None) -> Answer:
    """One image's output row made an answer: split, summed into makes (when `makes` is given),
    ranked to `k` classes with the named one first, and judged."""
    output = split_row(row, len(labels), extra_outputs)
    make = makes.top(output.probabilities) if makes is not None else None
    ranked = rank(output.probabilities, labels, k, first=int(named_classes(output.probabilities, makes)))
    return Answer(output, ranked, judge(output, acceptance, labels, min_probability, make, ranked[0]), make)
