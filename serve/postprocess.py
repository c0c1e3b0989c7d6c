"""Where model output becomes an answer: probabilities to sorted label/probability pairs."""

from __future__ import annotations

import torch


def top_k(probabilities: torch.Tensor, labels: list[str], k: int) -> list[dict]:
    """The k most likely labels of one image's probability row, most likely first."""
    k = max(1, min(k, len(labels)))
    values, indices = torch.topk(probabilities, k)
    return [{"label": labels[i], "probability": round(float(p), 6)} for p, i in zip(values.tolist(), indices.tolist())]
