"""A training loss that also scores the make: a wrong model of the right make costs less than a
wrong make.

The served answer falls back to the make when the model is uncertain, and the make's probability
is the sum of its models' probabilities; this loss trains that sum directly, beside the usual
per-model loss. The network is unchanged (one output per model), so serving is unchanged too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learners.classnames import parse


def make_index(labels: list[str]) -> tuple[list[str], torch.Tensor]:
    """The makes in sorted order, and for each label the index of its make."""
    makes = [parse(label)["make"] for label in labels]
    order = sorted(set(makes))
    return order, torch.tensor([order.index(m) for m in makes])


def make_log_probs(logits: torch.Tensor, groups: torch.Tensor, n_makes: int) -> torch.Tensor:
    """log P(make) for each row: log-sum-exp of the models' log-probabilities within each make."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    member = F.one_hot(groups.to(logits.device), n_makes).T.bool()  # (makes, models)
    masked = log_p.unsqueeze(1).masked_fill(~member, float("-inf"))  # (batch, makes, models)
    return torch.logsumexp(masked, dim=-1)


class MakeAwareLoss:
    """`base(logits, target) + weight * NLL(log P(make of target))`.

    fastai reads `activation` and `decodes` off the loss to turn outputs into predictions; the
    base loss's are used, so predictions stay per model.
    """

    def __init__(self, base, labels: list[str], weight: float):
        if weight <= 0:
            raise ValueError(f"the make loss weight must be positive, not {weight}")
        self.base, self.weight = base, weight
        self.makes, self.groups = make_index(labels)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.view(-1).long()
        per_make = make_log_probs(logits.view(-1, logits.shape[-1]), self.groups, len(self.makes))
        make_target = self.groups.to(target.device)[target]
        return self.base(logits, target) + self.weight * F.nll_loss(per_make, make_target)

    def activation(self, x):
        return self.base.activation(x)

    def decodes(self, x):
        return self.base.decodes(x)
