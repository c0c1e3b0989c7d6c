"""Loading a fastai Learner pickle: the one place whatcar unpickles anything.

A pickle runs code while it loads, so a learner must come from a trusted source.
`python -m train` writes `<learner>.json` beside it, recording the versions that
pickled it, so that a learner which no longer loads can be reported with both versions.
"""

from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path


class LearnerError(Exception):
    """The learner cannot be loaded or exported; the message says what to change."""


def installed_versions() -> dict:
    import fastai
    import torch
    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                "fastai": fastai.__version__}
    try:
        import timm
        versions["timm"] = timm.__version__
    except ImportError:
        versions["timm"] = None
    import PIL
    versions["pillow"] = PIL.__version__
    return versions


def sidecar_path(learner_path: Path) -> Path:
    return learner_path.with_name(learner_path.name + ".json")


def read_sidecar(learner_path: Path) -> dict:
    path = sidecar_path(learner_path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_sidecar(learner_path: Path, info: dict) -> None:
    sidecar_path(learner_path).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def load(learner_path: Path):
    """Load a learner for CPU inference, turning version trouble into one clear message."""
    if not learner_path.is_file():
        raise LearnerError(f"learner {learner_path} not found; train one with `make train DATA=...` "
                           "or pass LEARNER=path/to/export.pkl")
    import fastai.vision.all  # noqa: F401  - the classes and patches a vision learner relies on
    import torch

    recorded = read_sidecar(learner_path).get("versions", {})
    here = installed_versions()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fastai's pickle warning: the docs say it instead
            # fastai's load_learner hides some import errors; loading directly keeps the real one.
            learn = torch.load(learner_path, map_location="cpu", weights_only=False)
        learn.dls.cpu()
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many ways when the code it names has changed
        made_with = recorded.get("fastai", "an unknown version (no " + sidecar_path(learner_path).name + ")")
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise LearnerError(
            f"cannot load {learner_path}: it was pickled by fastai {made_with} (torch {recorded.get('torch', '?')}) "
            f"and this environment has fastai {here['fastai']} (torch {here['torch']}); "
            f"re-export it with the fastai it was trained with, or pin that version in requirements-train.txt "
            f"[{type(exc).__name__}: {detail}]") from None
    learn.model.eval()
    return learn


