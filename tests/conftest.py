from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARS = ROOT / "tests" / "data" / "cars"
# The committed model folder, and its current version's artifact folder.
ARTIFACTS = ROOT / "artifacts"
ARTIFACT = ARTIFACTS / (ARTIFACTS / "current").readlink()


def car_photos() -> list[Path]:
    return sorted(CARS.glob("*/*.jpg"))
