"""`python -m export`: turn a fastai Learner pickle into a served artifact folder.

    python -m export LEARNER [--also LEARNER ...] [--out artifacts] [--images DIR] [--name NAME]
                             [--no-compiled] [--quantize int8] [--triton]

Adds the next numbered version to the model folder (artifacts/2/, artifacts/3/, ...) and
points artifacts/current at it: model.pt (traced, frozen TorchScript), the same module
compiled for AVX2 CPUs once per shape the server runs (model-b1t1.pt2, model-b1t2.pt2 and the
dynamic-batch model.pt2, see export/compiled.py), labels.txt, manifest.json and checks/ (a few
parity photos with the top-1 the module gave them), and with --triton a Triton model
repository in triton/ too. The parity check runs first; if it fails nothing is added. Each
compiled package passes the same check or is left out, with the reason printed (with
--quantize int8, the one dynamic package's accuracy check instead, and then nothing is added
when it fails). Older
versions beyond --keep are removed, never current or previous.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from learners import classnames
from learners import learner as learner_io
from serve.model.artifact import ArtifactError, first_line, load_artifact
from serve.model.manifest import MANIFEST, Manifest, sha256_file
from serve.model.preprocess import Preprocessor
from serve.model.runtime.plan import PassPlan
from serve.model.runtime.torchscript import TorchScriptRunner
from serve.model.runtime.weights import WEIGHTS_FILE
from serve.model.versions import KEEP, VersionFolder

from . import acceptance, checks, compiled, parity, quantize, torchscript, triton
from .noncar_photos import MissingPhotos, noncar_photos
from .transforms import read_pipeline

PARITY_IMAGES = 24
FAMILIARITY_OUTPUT = {"name": "familiarity", "dtype": "float32", "shape": ["N"],
                      "description": "cosine of the photo's pooled features to the nearest class's mean over the "
                                     "training photos: low for photos unlike any the model was trained on"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("learner", type=Path,
                   help="fastai Learner saved with learn.export() (a pickle: trusted sources only)")
    p.add_argument("--out", type=Path, default=Path("artifacts"),
                   help="model folder: the export becomes its next numbered version and its current one "
                        "(default: artifacts)")
    p.add_argument("--keep", type=int, default=KEEP,
                   help="versions to keep in the model folder, besides current and previous (default: %(default)s)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of real images for the parity check (default: the validation images recorded "
                        "by `python -m train`)")
    p.add_argument("--parity-images", type=int, default=PARITY_IMAGES,
                   help="how many images the parity check uses (default: %(default)s, at least 20 for a release)")
    p.add_argument("--checks", type=int, default=checks.COUNT,
                   help="how many parity photos to keep in the artifact as check photos, with the top-1 the "
                        "exported module gave each (default: %(default)s)")
    p.add_argument("--no-acceptance", action="store_true",
                   help="skip calibration and the acceptance thresholds (needs no training photos; the server then "
                        "judges answers only when a request gives min_probability)")
    p.add_argument("--unknown", type=Path, default=None,
                   help="photos of other car models, to measure how many the acceptance rule turns away (default: "
                        "the training data folder's sibling <data>-unknown, if there is one); never used to fit")
    p.add_argument("--name", default=None,
                   help="model name in the manifest (default: whatcar-<training data folder><classes>, e.g. "
                        "whatcar-cars30, or the output folder's name when the learner has no training record)")
    p.add_argument("--no-compiled", dest="compiled", action="store_false",
                   help="write TorchScript only, without the compiled package (model.pt2) that needs a C++ compiler "
                        "here and 30-80 s")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="make the compiled package int8 (PT2E, calibrated on training photos); refused, and nothing "
                        "added, if its validation top-1 is more than 1 point below the float model's")
    p.add_argument("--int8-float", default="", metavar="PARTS",
                   help="with --quantize int8, parts left in float32: 'stem' (the first convolution), 'head' "
                        "(fastai's classifier head), or 'stem,head' (default: none)")
    p.add_argument("--calibration-images", type=int, default=quantize.CALIBRATION_IMAGES,
                   help="training photos that calibrate int8 activations (default: %(default)s)")
    p.add_argument("--also", type=Path, action="append", default=[], metavar="LEARNER",
                   help="another learner of the same classes, trained on the same split (repeat for more): the "
                        "artifact answers for them all, the normalised geometric mean of their probabilities, each "
                        "fed the first learner's input; costs one forward pass per learner")
    p.add_argument("--triton", action="store_true",
                   help="also write a Triton model repository (triton/<name>/) for the pytorch_libtorch backend; "
                        "`python -m export.triton` adds one to an existing artifact with more options")
    return p.parse_args(argv)


def parity_files(args: argparse.Namespace, info: dict) -> list[Path]:
    if args.images is not None:
        if not args.images.is_dir():
            raise learner_io.LearnerError(f"--images {args.images} is not a folder")
        candidates = [p for p in args.images.rglob("*") if p.is_file()]
    else:
        base = Path(info.get("data", "."))
        candidates = [base / rel for rel in info.get("valid_files", [])]
        candidates = [p for p in candidates if p.is_file()]
        if not candidates:
            raise learner_io.LearnerError("no parity images: the learner has no recorded validation files "
                                          "that exist here; pass --images DIR with real photos")
    files = parity.pick_images(candidates, args.parity_images)
    if not files:
        raise learner_io.LearnerError("no images found for the parity check")
    return files


def describe_arch(model) -> str:
    body = model[0] if isinstance(model, torch.nn.Sequential) and len(model) else model
    inner = getattr(body, "model", None)
    if inner is not None and hasattr(inner, "default_cfg"):
        return f"timm {inner.default_cfg.get('architecture', type(inner).__name__)} + fastai head"
    return f"{type(body).__name__} + fastai head"


def model_name(args: argparse.Namespace, info: dict, classes: int) -> str:
    """--name, else one that says what the model was trained on and how many classes it knows."""
    if args.name:
        return args.name
    if info.get("data"):
        data = re.sub(r"[^a-z0-9_.-]+", "-", Path(info["data"]).name.lower()).strip("-.") or "model"
        return f"whatcar-{data}{classes}"
    return args.out.resolve().name


def class_fields(vocab: list[str], info: dict) -> list[dict] | None:
    """Make, model, body style and year of each class, parsed once here for the manifest; None
    (and a line saying the make answer is off) when the names are not '<make> <model> ... <year>'."""
    data = Path(info["data"]) if info.get("data") and Path(info["data"]).is_dir() else None
    try:
        return classnames.class_fields(vocab, data)
    except classnames.ClassNameError as exc:
        print(f"classes: the make answer is off for this model, a class name does not parse: {exc}")
        return None


def load_also(args, vocab: list[str], pipe, info: dict) -> list:
    """The learners --also names, each checked to be able to join the first learner (its `vocab`,
    `pipe` and `info`) in one artifact."""
    if args.also and args.quantize:
        raise learner_io.LearnerError("--quantize int8 has not been measured on an ensemble; export --also "
                                      "without it")
    others = []
    for path in args.also:
        other = learner_io.load(path)
        other_info = learner_io.read_sidecar(path)
        other_pipe = read_pipeline(other.dls)
        if [str(v) for v in other.dls.vocab] != vocab:
            raise learner_io.LearnerError(f"--also {path} knows other classes than {args.learner} (or in another "
                                          "order); an ensemble needs the same ones")
        if (other_pipe.div, other_pipe.mean, other_pipe.std) != (pipe.div, pipe.mean, pipe.std):
            raise learner_io.LearnerError(f"--also {path} scales or normalises pixels differently from "
                                          f"{args.learner}; the artifact normalises them once for all")
        # A learner trained on another split trained on some of the validation photos, and every
        # figure the export measures on them would flatter the ensemble.
        if (other_info.get("data"), other_info.get("valid_files")) != (info.get("data"), info.get("valid_files")):
            raise learner_io.LearnerError(f"--also {path} was not trained on the same split of the same photos as "
                                          f"{args.learner} (its export.pkl.json records another data folder or "
                                          "validation photos)")
        check_softmax(other)
        others.append(other)
    return others


def check_softmax(learn) -> None:
    activation = getattr(learn.loss_func, "activation", None)
    probe = torch.randn(4, max(2, len(learn.dls.vocab)))
    if activation is None or not torch.allclose(activation(probe), torch.softmax(probe, dim=-1), atol=1e-6):
        raise learner_io.LearnerError(
            f"loss function {type(learn.loss_func).__name__} does not end in a softmax over classes; whatcar "
            "serves single-label classifiers (CrossEntropyLossFlat and friends)")


def fit_acceptance(args, info: dict, model, pipe, vocab: list[str], classes: list[dict] | None,
                   also: list) -> acceptance.Fitted:
    """Calibration and acceptance thresholds from the run's own validation and training photos."""
    data = Path(info.get("data", ""))
    valid_files = [data / rel for rel in info.get("valid_files", [])]
    if not info.get("data") or not valid_files or not all(f.is_file() for f in valid_files):
        raise learner_io.LearnerError(
            "calibration needs the training run's photos (the learner's export.pkl.json names them) and they are "
            "not all here; export where they are, or pass --no-acceptance for a model without calibration and "
            "acceptance thresholds")
    valid = acceptance.labelled(valid_files, vocab)
    held_out = set(valid_files)
    train = acceptance.labelled([f for f in acceptance.photos_under(data) if f not in held_out], vocab)
    unknown_dir = data.parent / f"{data.name}-unknown" if args.unknown is None else args.unknown
    unknown = acceptance.photos_under(unknown_dir) if unknown_dir and unknown_dir.is_dir() else []
    try:
        noncar = noncar_photos()
    except MissingPhotos as exc:
        print(f"acceptance: no non-car photos to measure with ({exc})", file=sys.stderr)
        noncar = []
    eager = torchscript.ServedModel(model, pipe.div, pipe.mean, pipe.std, also=also)
    return acceptance.fit(eager, pipe.steps, vocab, valid, train, unknown, noncar, classes)


def describe_source(path: Path, info: dict) -> dict:
    # A run that went on from another learner (--resume) records that run's recipe too, so the
    # manifest holds the whole chain that `make train` runs.
    return {"learner_file": path.name, "learner_sha256": sha256_file(path), "trained_with": info.get("versions"),
            "training": info.get("training"), "resumed_from": info.get("resumed_from")}


def build_manifest(args, learn, pipe, info, parity_report, folder: Path, check_photos: list,
                   fitted: acceptance.Fitted | None, classes: list[dict] | None, also: list) -> Manifest:
    extra = {"calibration": fitted.calibration, "acceptance": fitted.acceptance()} if fitted else {}
    if classes is not None:
        extra["classes"] = classes
    source = describe_source(args.learner, info)
    architecture = describe_arch(learn.model)
    if also:
        source["ensemble"] = [describe_source(path, learner_io.read_sidecar(path)) for path in args.also]
        architecture = (f"ensemble of {1 + len(also)} (geometric mean of their probabilities): "
                        + "; ".join(describe_arch(m.model) for m in [learn, *also]))
    return Manifest.create(
        folder, name=model_name(args, info, len(learn.dls.vocab)), model_file="model.pt", labels_file="labels.txt",
        num_classes=len(learn.dls.vocab), steps=pipe.steps, checks=check_photos,
        temperature=fitted.temperature if fitted else 1.0,
        extra_outputs=[FAMILIARITY_OUTPUT] if fitted else [],
        **extra,
        preprocessing={
            "decode": "Pillow; first frame; EXIF orientation applied; converted to 8-bit RGB (alpha dropped, "
                      "16-bit scaled)",
            "in_model": {"divide_by": pipe.div, "mean": pipe.mean, "std": pipe.std},
            "skipped_training_only": pipe.skipped,
            "identity_at_validation": pipe.identity,
        },
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        architecture=architecture,
        versions=learner_io.installed_versions(),
        source=source,
        validation=info.get("validation"),
        parity=parity_report.as_dict(),
    )


@dataclass
class Package:
    """A compiled package that passed its checks, and what the manifest says about it."""

    built: compiled.Compiled
    parity: parity.ParityReport
    quantization: dict | None = None

    def entry(self) -> dict:
        built = self.built
        return {"torch": built.torch, "cpu_capability": built.cpu_capability, "arch": built.arch,
                "min_batch": built.min_batch, "max_batch": built.max_batch, "threads": built.threads,
                "onednn_isa": built.onednn_isa, "weights": built.weights_at_load,
                "quantization": "int8" if self.quantization else None, "parity": self.parity.as_dict(),
                "compile_seconds": built.compile_seconds, "isa_check": built.isa_check,
                **({"int8": self.quantization} if self.quantization else {})}


def compiled_packages(args, learn, served, pipe, info: dict, files: list[Path], module, scratch: Path,
                      also: list, model_path: Path) -> list[Package]:
    """A compiled package of `served` for each shape in compiled.SHAPES (the dynamic one alone
    with --quantize int8), each checked like model.pt was; a shape that cannot be made or fails
    its check is left out, saying why, and its passes go to the next runtime when served. With
    --quantize int8 a failed check is an error: the int8 model was asked for.

    The float packages are compiled from `model_path` (model.pt as it will be written) and carry
    code only: they take their weights from model.pt at load (serve/model/runtime/weights.py), so a
    version stores its weights once. An int8 package holds its own (int8) weights."""
    height, width = pipe.steps[-1]["height"], pipe.steps[-1]["width"]
    packages = []
    for shape in compiled.SHAPES if not args.quantize else [compiled.Shape(None, None)]:
        started = time.perf_counter()
        try:
            if args.quantize:
                calibration = quantize.calibration_files(info, args.calibration_images)
                keep_float = [part for part in args.int8_float.split(",") if part]
                program = quantize.int8_program(served, pipe.steps, calibration, height, width, keep_float)
                print(f"int8: calibrated on {len(calibration)} training photos"
                      + (f", {' and '.join(keep_float)} left in float32" if keep_float else "")
                      + f" ({time.perf_counter() - started:.0f} s)")
            else:
                program = None
            exported = time.perf_counter()
            if program is None:
                built = from_model_pt(served, scratch, shape, model_path, height, width)
            else:
                built = compiled.compile_package(program, scratch, shape, quantized=bool(args.quantize))
            runner = compiled.load_runner(built, height, width, model_path)
            try:
                # The runner answers one row per image, the probabilities first (runtime/outputs.py's output_rows).
                classes = len(learn.dls.vocab)
                one = compiled.one_at_a_time(runner)
                report = parity.check(learn, lambda images, one=one, classes=classes: one(images)[:, :classes],
                                      pipe.steps, files, served.temperature, also)
                quantization = judge_int8(args, runner, module, pipe, info, learn, files) if args.quantize else None
            finally:
                runner.close()
        except Exception as exc:  # noqa: BLE001 - torch.export and Inductor fail in many ways; any means no package
            reason = str(exc) if isinstance(exc, compiled.CompileError) else first_line(exc)
            if args.quantize:
                raise compiled.CompileError(f"no int8 package: {reason}; nothing was added to {args.out}") from None
            print(f"export: no compiled {shape.name} package, its passes will run on the next runtime: {reason}")
            if isinstance(exc, compiled.NoCompilerError):
                break
            continue
        print(f"compiled {shape.name}: {built.path.stat().st_size / 1e6:.1f} MB for {built.cpu_capability} CPUs "
              f"by torch {built.torch}, exported in {exported - started:.0f} s and compiled in "
              f"{built.compile_seconds:.0f} s; {built.isa_check}; parity {report.top1_agree}/{report.images} top-1 "
              f"agree, max |p - p_fastai| = {report.max_abs_diff:.2e}")
        if not args.quantize and not report.passed:
            print(f"export: no compiled {shape.name} package, its passes will run on the next runtime: its parity "
                  f"check failed (tolerance {report.tolerance:g})")
            continue
        packages.append(Package(built, report, quantization))
    if not packages:
        print("export: no compiled package, the artifact serves TorchScript only")
    return packages


def from_model_pt(served, scratch: Path, shape: compiled.Shape, model_path: Path, height: int,
                  width: int) -> compiled.Compiled:
    """The package compiled from model.pt, taking its weights from it at load; where model.pt does
    not convert or compile (an ensemble of learners, whose traced graph the converter cannot turn
    back into a program), compiled from the module itself with its weights inside, saying so."""
    try:
        return compiled.compile_package(None, scratch, shape, torchscript=(model_path, height, width))
    except compiled.NoCompilerError:
        raise
    except compiled.CompileError as exc:
        print(f"export: {shape.name} keeps its own copy of the weights, as model.pt does not compile: {exc}")
    program = compiled.export_program(served, height, width, batch=shape.batch)
    return compiled.compile_package(program, scratch, shape)


def judge_int8(args, runner, module, pipe, info: dict, learn, files: list[Path]) -> dict:
    """Validation top-1 of the int8 package and the float module, printed; raises CompileError
    when int8 loses more than a point, or names a check photo differently than the float module."""
    valid = quantize.validation_files(info)
    if not valid:
        raise compiled.CompileError("the learner has no recorded validation photos to measure int8 accuracy on")
    vocab = [str(label) for label in learn.dls.vocab]
    float32 = quantize.accuracy(TorchScriptRunner(module), pipe.steps, valid, vocab)
    int8 = quantize.accuracy(runner, pipe.steps, valid, vocab)
    kept = quantize.acceptable(float32, int8)
    print(f"int8: validation top-1 {int8} against float32 {float32}: "
          + ("kept" if kept else f"refused (more than {100 * quantize.MAX_DROP:g} point lower)"))
    if not kept:
        raise compiled.CompileError(f"int8 validation top-1 {int8} is more than {100 * quantize.MAX_DROP:g} point "
                                    f"below float32's {float32}")
    # The photos kept as check photos must get the same answer from the package, or no server would load it.
    preprocessor = Preprocessor(pipe.steps, parity.MAX_PIXELS)
    for _, top1, path in checks.choose(checks.margins(module, preprocessor, files), args.checks):
        with torch.no_grad():
            got = int(runner(preprocessor(path.read_bytes()).unsqueeze(0))[0][:len(vocab)].argmax())
        if got != top1:
            raise compiled.CompileError(f"the int8 package names check photo {path.name} {vocab[got]!r}, the float "
                                        f"module {vocab[top1]!r}")
    return {"float32_top1": float32.top1, "int8_top1": int8.top1, "validation_images": int8.images,
            "calibration_images": args.calibration_images, "float_parts": args.int8_float or None}


# The passes compiled.SHAPES are for: one image on one thread, and on two.
SERVED_PASSES = PassPlan(workers=1, torch_threads=1, micro_batch=1, solo_threads=2)


def add_version(out: Path, fill, keep: int) -> str:
    """Build a new version beside `out`'s others, check it as the server would, then add it and
    make it current; returns its name. On any error `out` is untouched."""
    models = VersionFolder(out)
    if models.flat:
        raise ArtifactError(f"{out} holds a single unversioned artifact; move its files into {out}/1/ and "
                            f"`ln -s 1 {out}/current`, or export to another folder")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".new-", dir=out))
    staging.chmod(0o755)  # mkdtemp makes it private; the artifact is meant to be read by others
    try:
        fill(staging)
        # The server's own checks, before anything changes: TorchScript, and every compiled
        # package listed (one this host cannot run is an error here, not a fallback).
        load_artifact(staging, runtime="torchscript")
        listed = {package.shape for package in Manifest.read(staging).compiled}
        if listed:
            # auto: a shape that was left out only warns here; one that is listed must load.
            served = load_artifact(staging, runtime="auto", plan=SERVED_PASSES)
            # Those no planned pass uses load when first needed: load them now.
            loaded = {package.shape for package in getattr(served.runner, "packages", [])
                      if served.runner.runner_for(package) is not None}
            served.close()
            if loaded != listed:
                why = served.runtime.reason if served.runtime.name == "torchscript" else "the warning above says why"
                raise ArtifactError(f"compiled {', '.join(sorted(listed - loaded))} does not load here: {why}")
        version = models.add(staging)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    models.switch_to(version)
    removed = models.prune(keep)
    if removed:
        print(f"removed old versions {', '.join(removed)} (keeping {keep}, current and previous)")
    return version


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (learner_io.LearnerError, triton.TritonError, ArtifactError, compiled.CompileError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    learn = learner_io.load(args.learner)
    info = learner_io.read_sidecar(args.learner)
    if args.triton:
        # Refuse a bad name before the work.
        triton.check_name(model_name(args, info, len(learn.dls.vocab)))
    pipe = read_pipeline(learn.dls)
    check_softmax(learn)
    vocab = [str(v) for v in learn.dls.vocab]
    also = load_also(args, vocab, pipe, info)
    height, width = pipe.steps[-1]["height"], pipe.steps[-1]["width"]
    model = torchscript.plain(learn.model)
    members = [torchscript.plain(other.model) for other in also]
    fitted = None
    classes = class_fields(vocab, info)
    if not args.no_acceptance:
        fitted = fit_acceptance(args, info, model, pipe, vocab, classes, members)
        for line in acceptance.describe(fitted):
            print(line)
    served = torchscript.ServedModel(model, pipe.div, pipe.mean, pipe.std,
                                     temperature=fitted.temperature if fitted else 1.0,
                                     directions=fitted.directions if fitted else None,
                                     also=members)
    module = torchscript.trace_and_freeze(served, height, width)

    files = parity_files(args, info)
    report = parity.check(learn, module, pipe.steps, files, served.temperature, also)
    print(f"parity: {report.top1_agree}/{report.images} top-1 agree, max |p - p_fastai| = {report.max_abs_diff:.2e} "
          f"(tolerance {report.tolerance:g}); fastai's decoder gave identical pixels on "
          f"{report.decode_identical}/{report.images}")
    if not report.passed:
        print(f"export: parity check failed; nothing was added to {args.out}", file=sys.stderr)
        return 1

    scratch = tempfile.TemporaryDirectory(prefix="whatcar-export-")
    model_path = Path(scratch.name) / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, str(model_path))
    packages = []
    if args.compiled:
        packages = compiled_packages(args, learn, served, pipe, info, files, module, Path(scratch.name), also,
                                     model_path)

    def fill(folder: Path) -> None:
        # The very file the packages were compiled from: their constants are its tensors.
        shutil.copyfile(model_path, folder / "model.pt")
        (folder / "labels.txt").write_text("".join(f"{label}\n" for label in vocab), encoding="utf-8")
        found = checks.write_checks(folder, module, pipe.steps, vocab, files, args.checks)
        manifest = build_manifest(args, learn, pipe, info, report, folder, found, fitted, classes, also)
        for package in packages:
            shutil.copyfile(package.built.path, folder / package.built.path.name)
            manifest.add_compiled(folder, package.built.path.name, **package.entry())
        if compiled.version_weights(model_path, [p.built for p in packages], folder / WEIGHTS_FILE):
            manifest.add_file(folder, "weights", WEIGHTS_FILE)
        manifest.write(folder)
        if args.triton:
            triton.write_model_repository(folder, manifest)

    try:
        version = add_version(args.out, fill, args.keep)
    finally:
        scratch.cleanup()
    folder = args.out / version
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    weights = f"{WEIGHTS_FILE}, " if (folder / WEIGHTS_FILE).is_file() else ""
    print(f"wrote {folder}/ ({size / 1e6:.1f} MB): model.pt, "
          + "".join(f"{package.built.path.name}, " for package in packages) + weights
          + f"labels.txt, {MANIFEST}, {checks.FOLDER}/"
          + (f", {triton.REPOSITORY}/" if args.triton else "")
          + f"; {args.out}/current is now version {version} (`make reload` to serve it)")
    return 0
