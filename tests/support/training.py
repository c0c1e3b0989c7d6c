"""A tiny learner trained on the test photos, as the export tests need one."""

import subprocess
import sys
from pathlib import Path

from .paths import CARS, ROOT

SIZE = 64


def train_tiny(out: Path, *extra: str) -> Path:
    """`python -m train` on tests/data/cars at SIZE px, one head epoch and one unfrozen; the
    learner's path."""
    subprocess.run([sys.executable, "-m", "train", str(CARS), "--out", str(out), "--size", str(SIZE),
                    "--epochs", "1", "--freeze-epochs", "1", "--batch-size", "8", "--quiet", *extra],
                   check=True, cwd=ROOT)
    return out / "export.pkl"
