"""make compile: the current version's compiled packages built again for this machine's own CPU.

    python -m export.host [--model-dir artifacts] [--keep 5] [--portable]

`make export` compiles portable packages: AVX2 code, so that one committed build runs on every
x86-64 server. With --portable this builds those again (how a version exported with its weights
inside each package is stored with its weights once). On a CPU with more (AVX-512), that
leaves speed unused: on a 2-core AMD EPYC with AVX-512, one image on one thread took 21-22 ms
with the portable package and 14-15 ms with one built here, against OpenVINO fp32's 12 ms in
the same run.

This builds the same shapes from the version's own model.pt, in the serve virtualenv, with the
torch that serves them: the traced module is converted back to a program torch.export can
compile (compiled.torchscript_program), each shape is compiled for this CPU (export/compiled.py,
host=True) and must agree with model.pt on the version's check photos, as `make export`'s
packages agree with learn.predict. The result is a new version, a copy of the current one
whose packages are the host's, checked as the server loads it and made current; `make reload`
serves it and `make rollback` goes back. A shape that cannot be built or fails its check stops
the command with one line, and the model folder is left as it was.

The packages record the CPU model they were built on (`built_for`): a server on another CPU
passes them over with a WARNING and serves TorchScript, as for any package it cannot run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

# torch says at import that numpy is missing (the serve virtualenv has none); a failure here must
# be the only line on stderr.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402 - after the NumPy warning filter

from serve.model.artifact import ArtifactError  # noqa: E402
from serve.model.manifest import (  # noqa: E402
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
)
from serve.model.preprocess import Preprocessor  # noqa: E402
from serve.model.runtime.loading import cpu_model  # noqa: E402
from serve.model.runtime.torchscript import TorchScriptRunner  # noqa: E402
from serve.model.runtime.weights import WEIGHTS_FILE  # noqa: E402 - after the NumPy warning filter
from serve.model.versions import KEEP, VersionError, VersionFolder  # noqa: E402

from . import compiled, parity  # noqa: E402 - after the NumPy warning filter
from .cli import add_version  # noqa: E402 - after the NumPy warning filter


class HostCompileError(Exception):
    """The host's packages cannot be made; the message says why in one line."""


def check_against_torchscript(runner, module: torch.jit.ScriptModule, preprocessor: Preprocessor,
                              photos: list[Path]) -> dict:
    """Every output of the package against model.pt's on the check photos, one at a time."""
    reference = TorchScriptRunner(module)
    one = compiled.one_at_a_time(runner)
    agree, largest = 0, 0.0
    for photo in photos:
        pixels = preprocessor(photo.read_bytes()).unsqueeze(0)
        with torch.no_grad():
            want, got = reference(pixels), one(pixels)
        agree += int(want[0].argmax() == got[0].argmax())
        largest = max(largest, float((want - got).abs().max()))
    passed = bool(photos) and agree == len(photos) and largest <= parity.TOLERANCE
    return {"against": "model.pt", "images": len(photos), "top1_agree": agree, "max_abs_diff": largest,
            "tolerance": parity.TOLERANCE, "passed": passed}


def build(model_dir: Path, keep: int = KEEP, log=print, portable: bool = False) -> str:
    """The new version's name, made current; raises HostCompileError or ArtifactError.

    `portable`: the packages `make export` builds (AVX2 code, for any x86-64 server) instead
    of ones for this CPU: how a version exported before packages took their weights at load
    is stored again with its weights once."""
    models = VersionFolder(model_dir)
    try:
        source = models.folder(models.current())
    except VersionError as exc:
        raise HostCompileError(str(exc)) from None
    manifest = Manifest.read(source)
    packages = manifest.compiled
    if not packages:
        raise HostCompileError(f"version {source.name} has no compiled package to build for this host")
    if any(p.quantization for p in packages):
        raise HostCompileError(f"version {source.name} holds int8 packages, which only `make export` can build")
    height, width = manifest.input_size
    model_path = manifest.verified_file(source, "model")
    module = torch.jit.load(str(model_path), map_location="cpu").eval()
    photos = [source / check.file for check in manifest.checks]
    preprocessor = Preprocessor(manifest.steps, parity.MAX_PIXELS)
    built_for = None if portable else cpu_model() or None
    weights_file = manifest.weights_file

    def fill(staging: Path) -> None:
        for item in source.iterdir():
            if item.name != MANIFEST and item.name not in {p.file for p in packages} | {weights_file}:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        data = dict(manifest.data, files=dict(manifest.data["files"]))
        data["files"].pop("compiled")
        data["files"].pop("weights", None)
        data["format_version"] = FORMAT_VERSION
        new = Manifest(data, str(staging / MANIFEST))
        scratch = staging / ".compiling"
        made = []
        for package in packages:
            shape = compiled.Shape(package.min_batch if package.static else None, package.threads)
            started = time.perf_counter()
            try:
                # model.pt is converted in the compiling process, and the package keeps no weights.
                done = compiled.compile_package(None, scratch, shape, host=not portable,
                                                torchscript=(staging / model_path.name, height, width))
            except compiled.CompileError as exc:
                raise HostCompileError(f"{shape.name}: {exc}") from None
            runner = compiled.load_runner(done, height, width, staging / model_path.name)
            try:
                report = check_against_torchscript(runner, module, preprocessor, photos)
            finally:
                runner.close()
            if not report["passed"]:
                raise HostCompileError(f"{shape.name} disagrees with model.pt on the check photos: "
                                       f"{report['top1_agree']}/{report['images']} top-1 agree, max |p - p_model.pt| "
                                       f"= {report['max_abs_diff']:.2e} (tolerance {report['tolerance']:g})")
            shutil.move(done.path, staging / done.path.name)
            done.path = staging / done.path.name
            made.append(done)
            new.add_compiled(staging, done.path.name, torch=done.torch, cpu_capability=done.cpu_capability,
                             arch=done.arch, min_batch=done.min_batch, max_batch=done.max_batch,
                             threads=done.threads, onednn_isa=done.onednn_isa, built_for=built_for,
                             weights=done.weights_at_load,
                             parity=report, compile_seconds=done.compile_seconds, isa_check=done.isa_check)
            target = f"x86-64 CPUs with {done.cpu_capability}" if portable else \
                f"this {built_for or 'unknown'} CPU ({done.cpu_capability})"
            log(f"compiled {shape.name} for {target} in "
                f"{time.perf_counter() - started:.0f} s; {report['top1_agree']}/{report['images']} check photos "
                f"agree with model.pt, max |p - p_model.pt| = {report['max_abs_diff']:.2e}")
        if compiled.version_weights(staging / model_path.name, made, staging / WEIGHTS_FILE):
            new.add_file(staging, "weights", WEIGHTS_FILE)
        shutil.rmtree(scratch, ignore_errors=True)
        new.data["host_compile"] = {"from_version": source.name, "built_for": built_for,
                                    "torch": torch.__version__}
        new.write(staging)

    return add_version(model_dir, fill, keep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("artifacts"),
                   help="model folder whose current version is built again (default: %(default)s)")
    p.add_argument("--keep", type=int, default=KEEP, help="versions to keep (default: %(default)s)")
    p.add_argument("--portable", action="store_true",
                   help="build the portable AVX2 packages `make export` makes, not ones for this CPU: stores a "
                        "version exported before weights were kept once in today's form")
    args = p.parse_args(argv)
    try:
        version = build(args.model_dir, args.keep, portable=args.portable)
    except (HostCompileError, ArtifactError) as exc:
        print(f"make compile: {exc}; {args.model_dir} is unchanged", file=sys.stderr)
        return 1
    print(f"version {version} of {args.model_dir} is current, with packages built for "
          f"{'any x86-64 CPU with AVX2' if args.portable else 'this CPU'}; "
          "`make reload` serves it, `make rollback` goes back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
