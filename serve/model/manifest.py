"""An artifact's manifest.json, read and written in one place.

The exporter writes it, the server, the Triton writer and the tests read it, all through
`Manifest`, so each field has one name and one meaning. It is JSON and nothing else: reading
it never runs code.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ops import atomic

from .errors import ArtifactError

# 2: the module may return extra outputs after the probabilities ("extra_outputs"), and the
# manifest may carry "calibration" and "acceptance". A server that knows only 1 refuses 2.
# 3: files.compiled may be a list of packages, one per compiled shape (batch, threads).
# 4: compiled packages may take their weights at load (files.weights, a package's `weights`).
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
REQUIRED = ("files", "input", "preprocessing", "num_classes")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Acceptance:
    """When the named model (serve/model/postprocess.py) counts as an answer: its probability reaches
    `min_probability` and, when the module reports it, the photo's familiarity reaches
    `min_familiarity`."""

    min_probability: float
    min_familiarity: float | None = None
    # Below min_probability, the top make's probability (the sum over its models) from which the
    # answer is the make alone; None: no make-level answer.
    min_make_probability: float | None = None


@dataclass(frozen=True)
class CarClass:
    """What one output names, parsed once at export: `label` as in labels.txt, `name` as shown."""

    label: str
    name: str
    make: str
    model: str
    body: str | None
    year: int | None

    def as_dict(self) -> dict:
        return {"label": self.label, "name": self.name, "make": self.make, "model": self.model, "body": self.body,
                "year": self.year}


@dataclass(frozen=True)
class CompiledPackage:
    """One compiled package (an entry of files.compiled): the same module as model.pt, compiled
    to machine code for one CPU capability by one torch, for batches of min_batch to max_batch
    images on `threads` intra-op threads (None: its kernels follow the caller's thread count).

    A static package (one batch size, one thread count) is compiled with its convolution weights
    packed for oneDNN ahead of time, in the layout oneDNN picks for `onednn_isa`; a dynamic one
    packs nothing (onednn_isa None) and reorders weights on every pass (serve/model/runtime/shapes.py
    says what that costs)."""

    file: str
    sha256: str
    bytes: int
    torch: str            # torch.__version__ of the torch that compiled it
    cpu_capability: str   # the least torch.backends.cpu.get_cpu_capability() that runs it (AVX2, ...)
    arch: str             # platform.machine() it was compiled for
    min_batch: int
    max_batch: int
    quantization: str | None = None  # None (float32 weights) or "int8"
    threads: int | None = None
    onednn_isa: str | None = None
    # The CPU model `make compile` built it on (its code may use any instruction that CPU has);
    # None for the portable packages `make export` builds.
    built_for: str | None = None
    # "at load": the package carries code only and takes its weights from the version's one copy
    # (serve/model/runtime/weights.py); None: they are inside it (format 3 and int8 packages).
    weights: str | None = None

    @property
    def static(self) -> bool:
        return self.min_batch == self.max_batch and self.threads is not None

    @property
    def shape(self) -> str:
        """The shape's name in logs, metrics and JSON timings: b1t2 is batch 1 on 2 threads,
        b1-64 any batch from 1 to 64 on any thread count."""
        batch = str(self.min_batch) if self.min_batch == self.max_batch else f"{self.min_batch}-{self.max_batch}"
        return f"b{batch}" + (f"t{self.threads}" if self.threads is not None else "")

    def requirements(self) -> dict:
        """What serve/model/runtime/choice.py compares with the host."""
        return {"torch": self.torch, "cpu_capability": self.cpu_capability, "arch": self.arch,
                "onednn_isa": self.onednn_isa, "built_for": self.built_for, "weights": self.weights}

    @classmethod
    def parse(cls, entry: dict, source: str) -> CompiledPackage:
        where = f"{source}: files.compiled"
        try:
            batch = entry["batch"]
            package = cls(file=entry["file"], sha256=entry["sha256"], bytes=entry["bytes"], torch=entry["torch"],
                          cpu_capability=entry["cpu_capability"], arch=entry["arch"], min_batch=batch["min"],
                          max_batch=batch["max"], quantization=entry.get("quantization"),
                          threads=entry.get("threads"), onednn_isa=entry.get("onednn_isa"),
                          built_for=entry.get("built_for"), weights=entry.get("weights"))
        except (KeyError, TypeError):
            raise ArtifactError(f"{where} needs file, sha256, bytes, torch, cpu_capability, arch and "
                                "batch.min/batch.max for each package") from None
        texts = (package.file, package.sha256, package.torch, package.cpu_capability, package.arch)
        counts = (package.bytes, package.min_batch, package.max_batch)
        if not all(isinstance(v, str) and v for v in texts) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in counts) \
                or not 1 <= package.min_batch <= package.max_batch:
            raise ArtifactError(f"{where} has a field of the wrong type or an empty batch range")
        if package.threads is not None and (not isinstance(package.threads, int) or isinstance(package.threads, bool)
                                            or package.threads < 1):
            raise ArtifactError(f"{where}: threads must be a positive integer or absent")
        if package.onednn_isa is not None and not (isinstance(package.onednn_isa, str) and package.onednn_isa):
            raise ArtifactError(f"{where}: onednn_isa must be a name such as AVX2, or absent")
        if package.built_for is not None and not (isinstance(package.built_for, str) and package.built_for):
            raise ArtifactError(f"{where}: built_for must be a CPU model name, or absent")
        if package.weights not in (None, "at load"):
            raise ArtifactError(f"{where}: weights must be 'at load', or absent")
        return package


@dataclass(frozen=True)
class Check:
    """A photo kept in the artifact with the top-1 the exported model gave it: a loaded model
    that names it differently is not the model that was exported."""

    file: str
    sha256: str
    top1: str


class Manifest:
    """The parsed manifest, with the accessors serving needs; `data` is the JSON object."""

    def __init__(self, data: dict, source: str = MANIFEST):
        if not isinstance(data, dict):
            raise ArtifactError(f"{source} must hold a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise ArtifactError(f"{source} has no integer format_version")
        if version > FORMAT_VERSION:
            raise ArtifactError(f"{source} is format {version}, newer than this server understands "
                                f"({FORMAT_VERSION}); upgrade whatcar's serve side")
        for key in REQUIRED:
            if key not in data:
                raise ArtifactError(f"{source} lacks '{key}'")
        if not isinstance(data["input"], dict) or not isinstance(data["preprocessing"], dict):
            raise ArtifactError(f"{source}: 'input' and 'preprocessing' must be objects")
        self.data = data
        self.source = source

    # ------------------------------------------------------------------ reading and writing

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{path} not found; point --model-dir (WHATCAR_MODEL_DIR) at a folder written by "
                                "`make export`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
        return cls(data, str(path))

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        # Whole or not at all: a server reloading this folder never reads half a manifest.
        atomic.write_text(path, json.dumps(self.data, indent=2) + "\n")
        return path

    @classmethod
    def create(cls, folder: Path, *, name: str, model_file: str, labels_file: str, num_classes: int,
               steps: list[dict], preprocessing: dict | None = None, checks: list[Check] = (),
               extra_outputs: list[dict] = (), temperature: float = 1.0, **facts) -> Manifest:
        """A manifest for the files already written in `folder`, their checksums taken now.

        The input and output contract is the one every whatcar module has: uint8 RGB
        [N, 3, H, W] in, at the size the last preprocessing step produces, and float32 softmax
        probabilities [N, classes] out (softmax of the logits divided by `temperature`), then each
        of `extra_outputs` ({"name", "dtype", "shape", "description"}) in that order. `facts`
        (versions, architecture, parity, calibration, acceptance, ...) are kept as given.
        """
        folder = Path(folder)
        height, width = steps[-1]["height"], steps[-1]["width"]
        model = folder / model_file
        data = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "files": {
                "model": {"file": model_file, "sha256": sha256_file(model), "bytes": model.stat().st_size},
                "labels": {"file": labels_file, "sha256": sha256_file(folder / labels_file)},
            },
            "num_classes": num_classes,
            "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                      "height": height, "width": width, "batch": "any"},
            "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", num_classes],
                       "activation": "softmax", "temperature": temperature},
            "extra_outputs": list(extra_outputs),
            "preprocessing": {**(preprocessing or {}), "steps": steps},
            **facts,
        }
        if checks:
            data["checks"] = [{"file": c.file, "sha256": c.sha256, "top1": c.top1} for c in checks]
        return cls(data)

    # ------------------------------------------------------------------ accessors

    @property
    def name(self) -> str | None:
        return self.data.get("name")

    @property
    def num_classes(self) -> int:
        return self.data["num_classes"]

    @property
    def input_name(self) -> str:
        return self.data["input"].get("name", "images")

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the module takes."""
        return self.data["input"].get("height"), self.data["input"].get("width")

    @property
    def steps(self) -> list[dict]:
        return self.data["preprocessing"].get("steps", [])

    @property
    def model_sha256(self) -> str:
        return self.entry("model")[1]

    @property
    def extra_outputs(self) -> list[str]:
        """Names of what the module returns after the probabilities, in order (none before format 2)."""
        extras = self.data.get("extra_outputs", [])
        try:
            return [str(extra["name"]) for extra in extras]
        except (KeyError, TypeError):
            raise ArtifactError(f"{self.source}: each of 'extra_outputs' needs a name") from None

    @property
    def output_width(self) -> int:
        """Columns of the module's output once its outputs are put side by side (serve/model/artifact.py)."""
        return self.num_classes + len(self.extra_outputs)

    @property
    def acceptance(self) -> Acceptance | None:
        """The export's acceptance thresholds, or None for exports that recorded none."""
        block = self.data.get("acceptance")
        if block is None:
            return None
        def optional(key: str) -> float | None:
            return None if block.get(key) is None else float(block[key])

        try:
            probability = float(block["min_probability"])
            familiarity, make = optional("min_familiarity"), optional("min_make_probability")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ArtifactError(f"{self.source}: 'acceptance' needs a numeric min_probability (and numeric "
                                "min_familiarity and min_make_probability when given)") from None
        if familiarity is not None and "familiarity" not in self.extra_outputs:
            raise ArtifactError(f"{self.source}: 'acceptance' has a min_familiarity but the module has no "
                                "familiarity output")
        if make is not None and "classes" not in self.data:
            raise ArtifactError(f"{self.source}: 'acceptance' has a min_make_probability but no 'classes' say "
                                "which make each class is")
        return Acceptance(probability, familiarity, make)

    @property
    def classes(self) -> list[CarClass] | None:
        """Make, model, body style and year of each output, in labels order (None when the export
        recorded none: the make answer is then off)."""
        entries = self.data.get("classes")
        if entries is None:
            return None
        if not isinstance(entries, list) or len(entries) != self.num_classes:
            raise ArtifactError(f"{self.source}: 'classes' must list one entry for each of the "
                                f"{self.num_classes} classes")
        try:
            classes = [CarClass(str(c["label"]), str(c.get("name") or c["label"]), str(c["make"]), str(c["model"]),
                                None if c.get("body") is None else str(c["body"]),
                                None if c.get("year") is None else int(c["year"])) for c in entries]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ArtifactError(f"{self.source}: each of 'classes' needs label, make and model (body and year "
                                "may be null)") from None
        if any(not c.make.strip() for c in classes):
            raise ArtifactError(f"{self.source}: a class in 'classes' has an empty make")
        return classes

    @property
    def checks(self) -> list[Check]:
        checks = self.data.get("checks", [])
        if not isinstance(checks, list):
            raise ArtifactError(f"{self.source}: 'checks' must be a list")
        try:
            return [Check(str(c["file"]), str(c["sha256"]), str(c["top1"])) for c in checks]
        except (KeyError, TypeError):
            raise ArtifactError(f"{self.source}: each of 'checks' needs file, sha256 and top1") from None

    @property
    def compiled(self) -> list[CompiledPackage]:
        """The compiled packages, one per shape; empty when the artifact has none (TorchScript
        only). Format 2 wrote one entry, format 3 a list."""
        entries = self.data["files"].get("compiled") if isinstance(self.data["files"], dict) else None
        if entries is None:
            return []
        packages = [CompiledPackage.parse(entry, self.source)
                    for entry in (entries if isinstance(entries, list) else [entries])]
        shapes = [p.shape for p in packages]
        if len(set(shapes)) != len(shapes) or len({p.file for p in packages}) != len(packages):
            raise ArtifactError(f"{self.source}: files.compiled lists a shape or a file twice")
        return packages

    def add_compiled(self, folder: Path, file: str, *, torch: str, cpu_capability: str, arch: str, min_batch: int,
                     max_batch: int, quantization: str | None = None, threads: int | None = None,
                     onednn_isa: str | None = None, built_for: str | None = None, weights: str | None = None,
                     **facts) -> CompiledPackage:
        """List one more compiled package, already written in `folder`, its checksum taken now;
        `facts` (parity, compile time, ...) are kept as given."""
        path = Path(folder) / file
        entry = {"file": file, "sha256": sha256_file(path), "bytes": path.stat().st_size, "torch": torch,
                 "cpu_capability": cpu_capability, "arch": arch, "batch": {"min": min_batch, "max": max_batch},
                 "threads": threads, "onednn_isa": onednn_isa, "quantization": quantization,
                 **({"built_for": built_for} if built_for else {}), **({"weights": weights} if weights else {}),
                 **facts}
        entries = self.data["files"].get("compiled")
        entries = [] if entries is None else entries if isinstance(entries, list) else [entries]
        self.data["files"]["compiled"] = [e for e in entries if e.get("file") != file] + [entry]
        return CompiledPackage.parse(entry, self.source)

    @property
    def has_weights_file(self) -> bool:
        """Whether the version keeps the constants its packages take at load that model.pt does
        not hold (files.weights, serve/model/runtime/weights.py); versions before that have none."""
        files = self.data["files"]
        return isinstance(files, dict) and files.get("weights") is not None

    @property
    def weights_file(self) -> str | None:
        """The name of that file, or None for a version without one."""
        return self.entry("weights")[0] if self.has_weights_file else None

    def add_file(self, folder: Path, role: str, file: str) -> None:
        """List a file already written in `folder` under `role`, its checksum taken now."""
        path = Path(folder) / file
        self.data["files"][role] = {"file": file, "sha256": sha256_file(path), "bytes": path.stat().st_size}

    def verified_packages(self, folder: Path) -> list[tuple[CompiledPackage, Path]]:
        """Every compiled package with its path, each checked like verified_file."""
        return [(p, self.verified(folder, p.file, p.sha256, f"compiled {p.shape}")) for p in self.compiled]

    def entry(self, role: str) -> tuple[str, str]:
        """(file name, sha256) of a listed file."""
        try:
            entry = self.data["files"][role]
            return entry["file"], entry["sha256"]
        except (KeyError, TypeError):
            raise ArtifactError(f"{self.source} has no files.{role}.file and files.{role}.sha256") from None

    def describe(self) -> dict:
        """The facts a client may read about the model (for /metadata)."""
        return {key: copy.deepcopy(self.data.get(key)) for key in
                ("input", "preprocessing", "output", "extra_outputs", "architecture", "versions", "validation",
                 "calibration")}

    # ------------------------------------------------------------------ verification

    def verified(self, folder: Path, name: str, expected: str, role: str) -> Path:
        """The path of `name` in `folder`, checked to be inside it and to match `expected`."""
        folder = Path(folder)
        path = folder / name
        # The manifest names files inside the artifact folder only.
        if folder.resolve() not in path.resolve().parents:
            raise ArtifactError(f"{role} file {name!r} in {folder / MANIFEST} is not a file inside {folder}")
        if not path.is_file():
            raise ArtifactError(f"{role} file {path} is missing (listed in {folder / MANIFEST})")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{path} sha256 is {actual[:12]}..., the manifest says {expected[:12]}...: "
                                "the file was changed or belongs to another export")
        return path

    def verified_file(self, folder: Path, role: str) -> Path:
        """A listed file's path, after checking it exists inside `folder` and matches its sha256."""
        name, expected = self.entry(role)
        return self.verified(folder, name, expected, role)
