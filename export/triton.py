"""A Triton Inference Server model repository made from a whatcar artifact, for scaling out.

    python -m export.triton MODEL_DIR [--max-batch-size 32] [--instances 1]

Adds triton/ to the current version of MODEL_DIR (or to MODEL_DIR itself when it is one
artifact folder): a model repository for Triton's pytorch_libtorch backend:

    triton/<name>/config.pbtxt     inputs, outputs and batching, from the manifest
    triton/<name>/labels.txt       a copy of the artifact's labels, for Triton's classification
    triton/<name>/1/model.pt       the artifact's TorchScript, byte for byte (checked by sha256)

The model takes what whatcar's preprocessing produces: uint8 RGB [N, 3, H, W] in, float32
[N, classes] probabilities out. Triton does not decode images; clients (or a whatcar in front)
send preprocessed pixels. `python -m export --triton` writes the same folder during an export.
Only files are read and written here, so no fastai is needed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ops import atomic
from serve.model.errors import ArtifactError
from serve.model.manifest import Manifest, sha256_file
from serve.model.versions import VersionError, VersionFolder

REPOSITORY = "triton"
# The PyTorch backend binds tensors by position: TorchScript keeps no output names, so the
# names must follow its <name>__<index> convention.
INPUT_NAME = "images__0"
OUTPUT_NAME = "probabilities__0"
VERSION = "1"
DEFAULT_MAX_BATCH = 32
# Triton turns model names into folders and URL path segments.
VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TritonError(Exception):
    """The artifact cannot become a Triton repository; the message says why."""


def check_name(name) -> str:
    """`name` if Triton can use it as a model name (a folder and a URL path segment)."""
    if not isinstance(name, str) or not VALID_NAME.match(name):
        raise TritonError(f"model name {name!r} cannot name a Triton model; use letters, digits, '_', '.', '-' "
                          "(python -m export --name)")
    return name


def render_config(manifest: Manifest, max_batch_size: int = DEFAULT_MAX_BATCH, instances: int = 1) -> str:
    """config.pbtxt (protobuf text format) for the artifact described by `manifest`."""
    spec = manifest.data["input"]
    if spec.get("dtype") != "uint8" or spec.get("layout") != "NCHW" or spec.get("channels") != "RGB":
        raise TritonError(f"the manifest's input is {spec.get('dtype')} {spec.get('layout')} {spec.get('channels')}; "
                          "this writer knows uint8 NCHW RGB")
    output = manifest.data.get("output") or {}
    if output.get("dtype", "float32") != "float32":
        raise TritonError(f"the manifest's output is {output.get('dtype')}; this writer knows float32")
    if max_batch_size < 1 or instances < 1:
        raise TritonError("max batch size and instance count must be at least 1")
    name = check_name(manifest.name)
    sha = manifest.model_sha256
    return f"""\
# Written by `python -m export.triton` from whatcar artifact '{name}', model sha256 {sha}.
# uint8 RGB pixels, already preprocessed to {spec['height']}x{spec['width']} as the manifest says, in;
# softmax probabilities out. The batch dimension is implicit (max_batch_size).
name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ 3, {spec['height']}, {spec['width']} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {manifest.num_classes} ]
    label_filename: "labels.txt"
  }}
]
# Single requests are gathered into batches; the traced module accepts any batch size.
dynamic_batching {{ }}
# The module was traced on the CPU, where its normalisation constants live.
instance_group [
  {{
    count: {instances}
    kind: KIND_CPU
  }}
]
"""


def write_model_repository(folder: Path, manifest: Manifest, max_batch_size: int = DEFAULT_MAX_BATCH,
                           instances: int = 1) -> Path:
    """Write `folder`/triton for the artifact in `folder`; returns the model's own folder.

    Built beside the old repository and swapped in, so a failure leaves the old one whole.
    """
    folder = Path(folder)
    config = render_config(manifest, max_batch_size, instances)
    name = check_name(manifest.name)
    model_file, labels_file = manifest.verified_file(folder, "model"), manifest.verified_file(folder, "labels")
    staging = Path(tempfile.mkdtemp(prefix=f".{REPOSITORY}.new-", dir=folder))
    staging.chmod(0o755)  # mkdtemp makes it private; the artifact is meant to be read by others
    try:
        version_dir = staging / name / VERSION
        version_dir.mkdir(parents=True)
        shutil.copyfile(model_file, version_dir / "model.pt")
        shutil.copyfile(labels_file, staging / name / "labels.txt")
        (staging / name / "config.pbtxt").write_text(config, encoding="utf-8")
        if sha256_file(version_dir / "model.pt") != manifest.model_sha256:
            raise TritonError("the copied model.pt differs from the artifact's; is the disk full?")
        atomic.replace_folder(staging, folder / REPOSITORY)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder / REPOSITORY / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.triton", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="model folder (its current version is used) or one artifact folder")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH,
                        help="largest batch Triton may form (default: %(default)s)")
    parser.add_argument("--instances", type=int, default=1, help="model instances per Triton server (default: 1)")
    args = parser.parse_args(argv)
    try:
        models = VersionFolder(args.artifact)
        folder = models.folder(models.current())
        model_dir = write_model_repository(folder, Manifest.read(folder), args.max_batch_size, args.instances)
    except (TritonError, ArtifactError, VersionError) as exc:
        print(f"export.triton: {exc}", file=sys.stderr)
        return 1
    print(f"wrote Triton model repository {model_dir.parent}/ (model {model_dir.name}, version {VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
