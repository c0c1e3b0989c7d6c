from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARS = ROOT / "tests" / "data" / "cars"
ARTIFACTS = ROOT / "artifacts"


def car_photos() -> list[Path]:
    return sorted(CARS.glob("*/*.jpg"))
