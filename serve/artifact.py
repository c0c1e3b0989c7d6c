"""Where the exported artifact is read and verified: manifest, checksums, labels, TorchScript.

Nothing here unpickles Python objects: the model is a TorchScript archive and everything
else is JSON or text.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .preprocess import SpecError, validate_steps

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(Exception):
    """The artifact folder cannot be served; the message says what is wrong in one line."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_labels(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    labels = text.splitlines()
    if not labels or any(not label.strip() for label in labels):
        raise ArtifactError(f"{path}: labels must be one non-empty line per class")
    return labels


@dataclass
class Artifact:
    folder: Path
    manifest: dict
    labels: list[str]
    module: torch.jit.ScriptModule
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.folder.name)

    @property
    def sha256(self) -> str:
        return self.manifest["files"]["model"]["sha256"]

    @property
    def input_size(self) -> tuple[int, int]:
        spec = self.manifest["input"]
        return spec["height"], spec["width"]

    @property
    def steps(self) -> list[dict]:
        return self.manifest["preprocessing"]["steps"]


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} not found; point --model-dir (WHATCAR_MODEL_DIR) at a folder written by `make export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path} is format {version}, newer than this server understands ({FORMAT_VERSION}); "
                            "upgrade whatcar's serve side")
    for key in ("files", "input", "preprocessing", "num_classes"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks '{key}'")
    return manifest


def verify_file(folder: Path, manifest: dict, role: str) -> Path:
    """Check one listed file exists and matches its sha256; return its path."""
    try:
        entry = manifest["files"][role]
        name, expected = entry["file"], entry["sha256"]
    except (KeyError, TypeError):
        raise ArtifactError(f"{folder / MANIFEST} has no files.{role}.file and files.{role}.sha256") from None
    path = folder / name
    # The manifest names files inside the artifact folder only.
    if path.resolve().parent != folder.resolve():
        raise ArtifactError(f"{role} file {name!r} in {folder / MANIFEST} is not a file name inside {folder}")
    if not path.is_file():
        raise ArtifactError(f"{role} file {path} is missing (listed in {folder / MANIFEST})")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(f"{path} sha256 is {actual[:12]}..., the manifest says {expected[:12]}...: "
                            "the file was changed or belongs to another export")
    return path


def load_artifact(folder: str | Path, optimize: bool = True) -> Artifact:
    """Verify and load an artifact folder, or raise ArtifactError saying what is wrong."""
    started = time.perf_counter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    model_path = verify_file(folder, manifest, "model")
    labels = read_labels(verify_file(folder, manifest, "labels"))
    if len(labels) != manifest["num_classes"]:
        raise ArtifactError(f"labels file has {len(labels)} classes but the manifest says {manifest['num_classes']}")
    try:
        height, width = validate_steps(manifest["preprocessing"].get("steps", []))
    except SpecError as exc:
        raise ArtifactError(f"preprocessing in {folder / MANIFEST}: {exc}") from None
    if (height, width) != (manifest["input"].get("height"), manifest["input"].get("width")):
        raise ArtifactError(f"preprocessing produces {height}x{width} but the model input is "
                            f"{manifest['input'].get('height')}x{manifest['input'].get('width')}")
    try:
        with warnings.catch_warnings():
            # torch 2.14 flags jit.load as deprecated; it remains the loader for frozen archives.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(model_path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError or ValueError depending on the damage
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{model_path} is not a loadable TorchScript module: {first_line}") from None
    module.eval()
    probe = torch.zeros((1, 3, height, width), dtype=torch.uint8)
    with torch.inference_mode():
        try:
            if optimize:
                # Only in memory: a saved optimize_for_inference module does not load again. Done
                # before the probe, so the probe is also the optimised graph's first (slowest) pass.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    module = torch.jit.optimize_for_inference(module)
            out = module(probe)
        except Exception as exc:
            raise ArtifactError(f"{model_path} fails on a 1x3x{height}x{width} uint8 input: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    if out.ndim != 2 or out.shape[1] != len(labels):
        raise ArtifactError(f"model outputs shape {tuple(out.shape)} but there are {len(labels)} labels")
    return Artifact(folder=folder, manifest=manifest, labels=labels, module=module,
                    load_seconds=time.perf_counter() - started)
