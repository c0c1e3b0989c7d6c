"""What every runtime hands back: one float tensor [N, width] per pass, the probabilities first."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ArtifactError, first_line
from ..manifest import Manifest


def output_rows(outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A module's outputs as the one float tensor [N, width] a runner returns, for every runtime:
    a tensor as it is; a tuple or list as its first tensor (the probabilities, [N, classes])
    followed by the others, each flattened to N rows (a score [N] becomes one more column)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    first, *rest = outputs
    if not rest:
        return first
    rows = first.shape[0]
    return torch.cat([first] + [t.reshape(rows, -1).to(first.dtype) for t in rest], dim=1)


def probe(runner, path: Path, manifest: Manifest, classes: int) -> None:
    """One pass on a blank image: the model runs and answers one row per class."""
    height, width = manifest.input_size
    with torch.inference_mode():
        try:
            out = runner(torch.zeros((1, 3, height, width), dtype=torch.uint8))
        except Exception as exc:  # noqa: BLE001 - any failure of the probe is a bad model
            raise ArtifactError(f"{path} fails on a 1x3x{height}x{width} uint8 input: {first_line(exc)}") from None
    if out.ndim != 2 or out.shape[1] != manifest.output_width:
        extras = f" and {', '.join(manifest.extra_outputs)}" if manifest.extra_outputs else ""
        raise ArtifactError(f"{path.name}: model outputs shape {tuple(out.shape)} "
                            f"but there are {classes} labels{extras}")
