"""Calibrating a classifier's probabilities and deciding when its top answer is not to be trusted.

Pure torch, no fastai: the exporter feeds these functions validation logits and scores and
writes what they return into the artifact.

- `fit_temperature`: the T that makes softmax(logits / T) best match the labels (lowest NLL).
- `expected_calibration_error`: how far stated confidence is from accuracy, in equal-width bins.
- `calibrated_probabilities`: softmax(logits / T), the probabilities the served module returns.
- `class_directions`, `familiarity`: how close a photo's pooled features come to those of the
  training photos of any class; low for photos with no car at all.
- `roc_auc`: how well a score separates photos of known classes from others (rank-based).
- `choose_threshold`: the strictest acceptance threshold that still keeps a given share of
  photos of the known classes.
- `choose_precision_threshold`: the lowest threshold at which the make-level answers (their
  scores are serve.model.postprocess.Makes' sums over each make's classes, as the server sums them)
  are right often enough.
- `written_threshold`: a threshold as the manifest stores it, never above the one measured.
- `class_bootstrap`: how far a share measured on photos of a few classes (the unknown car models)
  may move on other classes: a percentile interval over the classes resampled with replacement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ECE_BINS = 15
# The highest temperature fitted. Real fits lie between about 0.5 and 3 (the default's is written in
# its manifest); logits no better than chance keep lowering the NLL as T grows, towards the uniform
# answer, and past about 1e7 float32 rounds every class's probability to one value, so the served
# top class would no longer be the model's own.
MAX_TEMPERATURE = 100.0


def _check_logits(logits: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"need logits of shape [N >= 1, classes >= 2], got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits hold NaN or infinite values")
    if labels is not None:
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"need one label per row of logits, got {tuple(labels.shape)} for {logits.shape[0]} rows")
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise ValueError("labels must be class indices within the logits' columns")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature 0 < T <= MAX_TEMPERATURE minimising the mean negative log-likelihood of
    softmax(logits / T).

    Optimised over log T, so T stays positive without constraints; the NLL is convex in 1/T,
    so L-BFGS from T = 1 finds the single minimum, and when that lies above the cap the cap is
    the best temperature within it.
    """
    _check_logits(logits, labels)
    logits, labels = logits.detach().double(), labels.detach().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if math.isnan(temperature) or temperature <= 0:
        raise ValueError(f"temperature fit diverged (T = {temperature}); are the logits all identical?")
    return min(temperature, MAX_TEMPERATURE)


def calibrated_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def class_directions(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """The unit-length mean feature vector of each class, [classes, D], for `familiarity`."""
    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise ValueError("need features [N, D] and one label per row")
    labels = labels.detach().long()
    counts = torch.bincount(labels, minlength=classes)
    if len(counts) != classes or (counts == 0).any():
        raise ValueError("every class needs at least one photo and labels must be below `classes`")
    sums = torch.zeros(classes, features.shape[1], dtype=torch.float64).index_add_(0, labels,
                                                                            features.detach().double())
    return torch.nn.functional.normalize(sums / counts[:, None], dim=1).float()


def familiarity(features: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of features to the nearest class direction, in [-1, 1].

    Measured on the current default model's 2560-d pooled features, it tells known cars from
    non-car photos almost perfectly (ROC AUC 0.994) but one car model from another poorly (0.64),
    which is what the top probability does better. Plain tensor operations, so it can be traced
    into the served module.
    """
    return (torch.nn.functional.normalize(features, dim=-1) @ directions.T).max(dim=-1).values


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error on the top class, with `bins` equal-width confidence bins.

    The sum over bins of (share of photos in the bin) * |accuracy in the bin - mean confidence in
    the bin|. A confidence of exactly 1 falls in the last bin, and bins are closed on the right
    ((0, 1/15], (1/15, 2/15], ...), as in Guo et al. 2017.
    """
    _check_logits(probabilities, labels)
    if bins < 1:
        raise ValueError("need at least one bin")
    confidence, predicted = probabilities.detach().double().max(dim=-1)
    correct = (predicted == labels).double()
    # ceil(c * bins) - 1 puts c in (k/bins, (k+1)/bins] into bin k; clamp sends 0 to the first bin.
    index = (torch.ceil(confidence * bins) - 1).clamp(0, bins - 1).long()
    total = 0.0
    for k in range(bins):
        members = index == k
        count = int(members.sum())
        if count:
            total += count * abs(float(correct[members].mean()) - float(confidence[members].mean()))
    return total / len(labels)


def roc_auc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """Area under the ROC curve of a score meant to be higher for `known` photos than `unknown` ones.

    The chance that a random known photo outscores a random unknown one, ties counting half
    (the Mann-Whitney U statistic over the product of the two counts).
    """
    known, unknown = known.detach().double().flatten(), unknown.detach().double().flatten()
    if known.numel() == 0 or unknown.numel() == 0:
        raise ValueError("need at least one known and one unknown score")
    if not (torch.isfinite(known).all() and torch.isfinite(unknown).all()):
        raise ValueError("scores hold NaN or infinite values")
    scores = torch.cat([known, unknown])
    # Average 1-based ranks, so that tied scores share their rank.
    _, group, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = ((last - counts + 1 + last) / 2)[group]
    n_known, n_unknown = known.numel(), unknown.numel()
    u = float(ranks[:n_known].sum()) - n_known * (n_known + 1) / 2
    return u / (n_known * n_unknown)


def choose_threshold(known: torch.Tensor, keep: float) -> float:
    """The highest threshold t such that at least `keep` of the `known` scores are >= t.

    A photo is accepted when its score is at least the threshold. Every rejection rate on other
    photos can only grow with t, so the highest t that still keeps the wanted share of known
    photos is the best one for any set of unknown photos: they are needed to choose the score,
    not the threshold. Ties at the threshold are all kept, so the share kept may exceed `keep`.
    """
    scores = known.detach().double().flatten()
    if scores.numel() == 0:
        raise ValueError("need at least one known score")
    if not torch.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], not {keep}")
    # The k-th highest score keeps k photos (more with ties); k = ceil(keep * n), with a small
    # allowance so that keep = 0.9 of 10 photos asks for 9, not 10 after float rounding.
    k = max(1, math.ceil(keep * scores.numel() - 1e-9))
    return float(torch.sort(scores, descending=True).values[k - 1])


def acceptance(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where a photo's score reaches the threshold.

    Compared in float64: torch would round the threshold to a float32 score's precision, while
    the server compares each score, made a Python float, with the threshold as written.
    """
    return scores.double() >= threshold


def written_threshold(threshold: float, digits: int = 6) -> float:
    """`threshold` with `digits` decimals, rounded down: the manifest's threshold then accepts
    every photo the measured one did, so the figures measured with it hold for the server."""
    rounded = round(threshold, digits)
    return rounded if rounded <= threshold else round(rounded - 10.0 ** -digits, digits)


def choose_precision_threshold(scores: torch.Tensor, correct: torch.Tensor, precision: float) -> float | None:
    """The lowest threshold t at which the photos with a score >= t are right at least
    `precision` of the time (ties at t all count); None when no threshold reaches it.

    Lower thresholds answer more photos, so the lowest one that keeps the precision answers the
    most while still being right as often as asked.
    """
    scores, correct = scores.detach().double().flatten(), correct.detach().bool().flatten()
    if scores.shape != correct.shape:
        raise ValueError("need one correctness flag per score")
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision must be in (0, 1], not {precision}")
    order = torch.argsort(scores, descending=True)
    ranked, hits = scores[order], correct[order].double()
    # Precision of "score >= ranked[i]": ties are all in, so use the last position of each value.
    cumulative = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    best = None
    for i in range(len(ranked)):
        if i + 1 < len(ranked) and ranked[i + 1] == ranked[i]:
            continue
        if cumulative[i] >= precision - 1e-12:
            best = float(ranked[i])
    return best


def top_k_accuracy(probabilities: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among their k most probable classes."""
    top = probabilities.topk(min(k, probabilities.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())


def confused_pairs(predicted: torch.Tensor, labels: torch.Tensor, names: list[str], most: int = 10) -> list[dict]:
    """The `most` class pairs mistaken for each other most often, either way round, most first;
    ties in the order of the pair's first mistake."""
    counts: dict[tuple[int, int], int] = {}
    for p, t in zip(predicted.tolist(), labels.tolist()):
        if p != t:
            pair = (min(p, t), max(p, t))
            counts[pair] = counts.get(pair, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:most]
    return [{"a": names[a], "b": names[b], "count": n} for (a, b), n in ranked]


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    level: float
    draws: int
    groups: int

    def as_dict(self) -> dict:
        return {"low": round(self.low, 4), "high": round(self.high, 4), "level": self.level, "draws": self.draws,
                "classes": self.groups, "method": "bootstrap over the classes, resampled with replacement"}


def class_bootstrap(hits: torch.Tensor, groups: torch.Tensor, draws: int = 2000, level: float = 0.95,
                    seed: int = 0) -> Interval:
    """A percentile bootstrap interval of the share of `hits` (one flag per photo) when the
    classes (`groups`, one id per photo) are drawn with replacement, each draw as many classes
    as there are, every photo of a drawn class counted once per draw.

    The photos of one model are alike, so the spread that matters for other, unseen models is
    that between models, not between photos: resampling photos would understate it.
    Deterministic for a given `seed`.
    """
    hits, groups = hits.detach().bool().flatten(), groups.detach().flatten()
    if hits.shape != groups.shape or hits.numel() == 0:
        raise ValueError("need one class id per photo, and at least one photo")
    if draws < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need draws >= 1 and 0 < level < 1, not {draws} and {level}")
    _, group_index = torch.unique(groups, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    photos = torch.bincount(group_index, minlength=n_groups).double()
    right = torch.bincount(group_index, weights=hits.double(), minlength=n_groups)
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, n_groups, (draws, n_groups), generator=generator)
    shares = right[drawn].sum(dim=1) / photos[drawn].sum(dim=1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(shares, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(low, high, level, draws, n_groups)
