"""Real photographs with no car in them, shipped inside installed packages' wheels.

The exporter measures how many of them the acceptance threshold turns away. Nothing is
downloaded: scikit-image, scikit-learn and matplotlib (all pinned in requirements-train.txt)
carry these files in their wheels. Synthetic images (charts, checkerboards, logos, phantoms)
are left out, and so is the second of scikit-image's two near-identical motorcycle stereo views.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# (package, folder inside it, files): a portrait, a cat, coffee, coins, a rocket launch, the moon,
# textures, microscopy and telescope images, a motorcycle, a landscape, a flower.
SOURCES = (
    ("skimage", "data", ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "brick.png",
                         "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
                         "motorcycle_left.png", "retina.jpg", "rocket.jpg", "clock_motion.png")),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)),
)


class MissingPhotos(Exception):
    """A package that should ship a photo is missing or no longer has it."""


def noncar_photos() -> list[Path]:
    """Paths of the bundled non-car photographs, in a fixed order."""
    found = []
    for package, folder, names in SOURCES:
        try:
            root = resources.files(package)
        except ModuleNotFoundError:
            raise MissingPhotos(f"{package} is not installed; it is pinned in requirements-train.txt") from None
        for name in names:
            path = Path(str(root.joinpath(*folder.split("/"), name)))
            if not path.is_file():
                raise MissingPhotos(f"{package} no longer ships {folder}/{name}")
            found.append(path)
    return found
