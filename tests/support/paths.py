"""Where the tests find the repository, its photos and models, and the serve side's Python."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARS = ROOT / "tests" / "data" / "cars"
# The committed model folder, and its current version's artifact folder.
ARTIFACTS = ROOT / "artifacts"
ARTIFACT = ARTIFACTS / (ARTIFACTS / "current").readlink()
# Tests run from another virtualenv (client, Ray) start the server or `make classify` from this one,
# as they are deployed.
SERVE_PYTHON = Path(os.environ.get("WHATCAR_SERVE_PYTHON", ROOT / ".venv" / "serve" / "bin" / "python"))


def car_photos() -> list[Path]:
    return sorted(CARS.glob("*/*.jpg"))
