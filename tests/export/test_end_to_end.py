"""Train a tiny learner on real photos, export it, and check the artifact end to end.

The artifact and the probabilities seen here are left in $WHATCAR_CROSS_DIR (when set) for
tests/cross, which loads them under the serve side's torch.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import classnames, cli, quantize
from export import compiled as compiled_mod
from export.learner import LearnerError, load, write_sidecar
from serve.artifact import load_artifact, sha256_file
from serve.manifest import Manifest
from serve.preprocess import Preprocessor
from serve.runtime.choice import PACKED_AT_LOAD
from serve.runtime.compiled import extract_library
from serve.runtime.weights import WEIGHTS_FILE
from serve.versions import ModelFolder
from tests.support.paths import CARS, car_photos
from tests.support.training import SIZE, train_tiny


@pytest.fixture(scope="module")
def learner(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def exported(learner, tmp_path_factory) -> Path:
    """The model folder the export wrote its first version into, compiled package included (its
    export and compile times are printed with -s)."""
    out = tmp_path_factory.mktemp("exported") / "tiny"
    assert cli.main([str(learner), "--out", str(out), "--images", str(CARS)]) == 0
    return out


@pytest.fixture(scope="module")
def artifact(exported) -> Path:
    assert ModelFolder(exported).current() == "1"
    return exported / "1"


def test_training_records_its_run(learner):
    info = json.loads(learner.with_name("export.pkl.json").read_text())
    assert info["versions"]["fastai"] and info["versions"]["torch"] == torch.__version__
    assert len(info["valid_files"]) == info["validation"]["images"] > 0
    assert 0.0 <= info["validation"]["accuracy"] <= 1.0


def test_resume_continues_on_the_same_split(learner, tmp_path):
    train_tiny(tmp_path, "--resume", str(learner))  # a resumed run trains no head-only epochs
    before = json.loads(learner.with_name("export.pkl.json").read_text())
    after = json.loads((tmp_path / "export.pkl.json").read_text())
    assert after["valid_files"] == before["valid_files"]
    assert after["resumed_from"] == before["training"]


def test_the_manifest_keeps_the_run_a_resumed_learner_went_on_from(tmp_path):
    learner = tmp_path / "export.pkl"
    learner.write_bytes(b"weights")
    first, second = {"size": 224, "resume": None}, {"size": 256, "resume": "models/base/export.pkl"}
    source = cli.describe_source(learner, {"versions": {}, "training": second, "resumed_from": first})
    assert (source["training"], source["resumed_from"]) == (second, first)
    assert cli.describe_source(learner, {"training": first})["resumed_from"] is None


def test_manifest_describes_the_artifact(artifact, learner):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    assert manifest["num_classes"] == 3
    assert manifest["name"] == "whatcar-cars3"  # from the training data's folder and class count
    assert manifest["input"] == {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                                 "height": SIZE, "width": SIZE, "batch": "any"}
    assert manifest["preprocessing"]["steps"][0]["op"] == "resize"
    assert manifest["preprocessing"]["steps"][0]["method"] == "squish"
    assert manifest["preprocessing"]["in_model"]["divide_by"] == 255.0
    assert manifest["output"]["activation"] == "softmax"
    assert manifest["extra_outputs"] == [dict(cli.FAMILIARITY_OUTPUT)]
    calibration = manifest["calibration"]
    valid_files = json.loads(learner.with_name("export.pkl.json").read_text())["valid_files"]
    assert calibration["temperature"] > 0 and calibration["photos"] == len(valid_files)
    assert 0 <= calibration["ece_after"] <= 1 and 0 <= calibration["ece_before"] <= 1
    accept = manifest["acceptance"]
    assert 0 < accept["min_probability"] <= 1 and -1 <= accept["min_familiarity"] <= 1
    figures = accept["figures"]
    assert figures["validation"]["accepted"] >= 0.9
    assert 0 <= figures["validation"]["top5"] <= 1 and 0 <= figures["validation"]["make_accuracy"] <= 1
    assert isinstance(figures["confusions"], list)
    # Each class's fields, parsed from the Stanford names at export, in labels order.
    assert manifest["classes"] == [{"label": name, "name": name, **classnames.parse(name)}
                                   for name in sorted(p.name for p in CARS.iterdir())]
    # Its classes carry makes, so the make level has a threshold: 1 when none was right often enough.
    assert 0 <= accept["min_make_probability"] <= 1
    assert figures["non_car"]["photos"] == 18 and 0 <= figures["non_car"]["rejected"] <= 1
    assert manifest["versions"]["torch"] == torch.__version__
    assert len(manifest["source"]["learner_sha256"]) == 64
    parity = manifest["parity"]
    assert parity["passed"] and parity["images"] == 24 and parity["top1_agree"] == 24
    assert parity["max_abs_diff"] <= 1e-3
    labels = (artifact / "labels.txt").read_text().splitlines()
    assert labels == sorted(p.name for p in CARS.iterdir())


def test_check_photos_are_kept_with_the_answer_the_module_gave(artifact):
    manifest = Manifest.read(artifact)
    checks = manifest.checks
    assert len(checks) == 6
    for runtime in ("torchscript", "compiled"):
        loaded = load_artifact(artifact, runtime=runtime)
        preprocessor = Preprocessor(loaded.steps, 10**8)
        for check in checks:
            path = manifest.verified(artifact, check.file, check.sha256, "check")
            assert path.parent == artifact / "checks"
            with torch.no_grad():
                row = loaded.runner(preprocessor(path.read_bytes()).unsqueeze(0))[0]
            # The probabilities come first; the familiarity column after them is no class.
            top1 = int(row[:len(loaded.labels)].argmax())
            assert loaded.labels[top1] == check.top1, runtime
        loaded.close()
    # The surest answers, spread over the classes before any class repeats.
    assert len({check.top1 for check in checks}) == min(6, manifest.num_classes)


@pytest.mark.parametrize("argv, info, expected", [
    (["--name", "my-model"], {"data": "/photos/cars"}, "my-model"),
    ([], {"data": "/data/Stanford Cars!"}, "whatcar-stanford-cars30"),
    ([], {}, "out-folder"),
])
def test_model_name_comes_from_the_flag_the_training_data_or_the_folder(tmp_path, argv, info, expected):
    args = cli.parse_args(["learner.pkl", "--out", str(tmp_path / "out-folder"), *argv])
    assert cli.model_name(args, info, 30) == expected


def test_module_batches_any_size_and_matches_single_images(artifact):
    loaded = load_artifact(artifact, runtime="torchscript")
    preprocessor = Preprocessor(loaded.steps, 10**8)
    pixels = torch.stack([preprocessor(p.read_bytes()) for p in car_photos()[:5]])
    probabilities, familiarity = loaded.module(pixels)
    together = loaded.runner(pixels)  # what the server's inference threads get: both, side by side
    one_by_one = torch.cat([loaded.runner(pixels[i:i + 1]) for i in range(5)])
    assert probabilities.shape == (5, 3) and familiarity.shape == (5,) and together.shape == (5, 4)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(5), atol=1e-5)
    assert ((familiarity > -1.0001) & (familiarity < 1.0001)).all()
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_failed_parity_adds_nothing_to_the_model_folder(learner, exported, monkeypatch, capsys):
    def contents():
        return {str(p.relative_to(exported)): p.read_bytes() for p in exported.rglob("*") if p.is_file()}

    before = contents()
    real_check = cli.parity.check

    def one_disagreement(*args, **kwargs):
        report = real_check(*args, **kwargs)
        report.top1_agree -= 1
        return report

    monkeypatch.setattr(cli.parity, "check", one_disagreement)
    assert cli.main([str(learner), "--out", str(exported), "--images", str(CARS)]) == 1
    assert "parity check failed" in capsys.readouterr().err
    assert contents() == before and ModelFolder(exported).versions() == ["1"]


def test_each_export_adds_a_version_makes_it_current_and_keeps_the_last_few(learner, tmp_path):
    out = tmp_path / "models"
    args = [str(learner), "--out", str(out), "--images", str(CARS), "--parity-images", "2", "--checks", "2",
            "--keep", "2", "--no-compiled"]
    for _ in range(4):
        assert cli.main(args) == 0
    models = ModelFolder(out)
    assert models.versions() == ["3", "4"] and models.current() == "4" and models.previous() == "3"
    load_artifact(models.folder("4"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_an_unversioned_artifact_folder_is_not_overwritten(learner, artifact, tmp_path, capsys):
    flat = tmp_path / "flat"
    shutil.copytree(artifact, flat)
    assert cli.main([str(learner), "--out", str(flat), "--images", str(CARS), "--parity-images", "2",
                     "--no-compiled"]) == 1
    assert "single unversioned artifact" in capsys.readouterr().err
    assert sorted(p.name for p in flat.iterdir()) == sorted(p.name for p in artifact.iterdir())


def test_learner_from_another_fastai_names_both_versions(tmp_path):
    import fastai

    bogus = tmp_path / "export.pkl"
    # A pickle naming a class that this fastai does not have, as after a rename upstream.
    module = tmp_path / "vanished_mod.py"
    module.write_text("class Gone:\n    pass\n")
    script = (f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); import vanished_mod; "
              f"torch.save(vanished_mod.Gone(), {str(bogus)!r})")
    subprocess.run([sys.executable, "-c", script], check=True)
    module.unlink()
    write_sidecar(bogus, {"versions": {"fastai": "2.7.19", "torch": "2.5.1"}})
    with pytest.raises(LearnerError) as caught:
        load(bogus)
    message = str(caught.value)
    assert "fastai 2.7.19" in message and f"fastai {fastai.__version__}" in message
    assert "vanished_mod" in message


def test_missing_learner_says_how_to_make_one(tmp_path):
    assert cli.main([str(tmp_path / "nope.pkl"), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


# compile_package's default: the package for any batch on any thread count.
ANY_SHAPE = compiled_mod.Shape(None, None)
SHAPES = {"b1t1": ("model-b1t1.pt2", 1, 1, 1, PACKED_AT_LOAD), "b1t2": ("model-b1t2.pt2", 1, 1, 2, PACKED_AT_LOAD),
          "b1-64": ("model.pt2", 1, 64, None, None)}


def test_a_compiled_package_is_listed_for_each_shape_and_scores_like_torchscript(artifact):
    manifest = Manifest.read(artifact)
    packages = {p.shape: p for p in manifest.compiled}
    assert set(packages) == set(SHAPES), "the export left out a shape (see its output)"
    scripted = load_artifact(artifact, runtime="torchscript")
    preprocessor = Preprocessor(scripted.steps, 10**8)
    pixels = torch.stack([preprocessor(p.read_bytes()) for p in car_photos()[:5]])
    with torch.inference_mode():
        reference = scripted.runner(pixels)
    entries = {e["file"]: e for e in manifest.data["files"]["compiled"]}
    for shape, (file, low, high, threads, isa) in SHAPES.items():
        package = packages[shape]
        assert (package.file, package.min_batch, package.max_batch, package.threads, package.onednn_isa) == \
            (file, low, high, threads, isa)
        assert (package.cpu_capability, package.torch) == ("AVX2", torch.__version__)
        entry = entries[file]
        assert entry["parity"]["passed"] and entry["parity"]["top1_agree"] == entry["parity"]["images"] == 24
        assert entry["quantization"] is None and entry["compile_seconds"] > 0
        # Code only: the weights are model.pt's, handed over at load.
        assert package.weights == "at load"
        assert package.bytes == (artifact / file).stat().st_size < (artifact / "model.pt").stat().st_size / 2
        runner = compiled_mod.load_runner(compiled_mod.Compiled(
            artifact / file, package.torch, package.cpu_capability, package.arch, low, high, 1.0, "", threads, isa,
            weights=artifact / WEIGHTS_FILE), *scripted.input_size, artifact / "model.pt")
        one = compiled_mod.one_at_a_time(runner)
        with torch.inference_mode():
            one_by_one = torch.cat([one(pixels[i:i + 1]) for i in range(5)])
            together = runner(pixels) if threads is None else one_by_one
        runner.close()
        assert one_by_one.shape == (5, manifest.output_width)  # probabilities, then familiarity
        assert torch.allclose(one_by_one, reference, atol=1e-4), shape
        assert torch.allclose(together, one_by_one, atol=1e-5), shape
    # The server picks among them by shape.
    served = load_artifact(artifact, runtime="compiled")
    assert served.runtime.name == "compiled" and served.module is None
    assert sorted(p.shape for p in served.runner.packages) == sorted(SHAPES)
    served.close()
    scripted.close()


def test_compiled_packages_have_no_avx512_instruction_and_the_count_would_see_one(artifact, tmp_path):
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed: the export notes it skipped this check")
    for entry in Manifest.read(artifact).data["files"]["compiled"]:
        library = extract_library(artifact / entry["file"], tmp_path)
        assert compiled_mod.evex_instructions(library) == 0, entry["file"]
        assert "no AVX-512" in entry["isa_check"]
    # The same count on a library that does hold AVX-512 instructions.
    source = tmp_path / "wide.c"
    source.write_text("void add(float *a) { __asm__ volatile(\"vaddps %%zmm0, %%zmm1, %%zmm2\" ::: \"memory\"); "
                      "__asm__ volatile(\"vmovups %%zmm2, (%0)\" :: \"r\"(a) : \"memory\"); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-mavx512f", "-o", str(tmp_path / "wide.so"), str(source)], check=True)
    assert compiled_mod.evex_instructions(tmp_path / "wide.so") == 2


@pytest.mark.parametrize("failure", ["parity", "compile", "one shape", "no compiler"])
def test_without_a_passing_compiled_package_the_export_keeps_torchscript_and_says_why(
        failure, learner, artifact, tmp_path, monkeypatch, capsys):
    """Each way a package can fail leaves it out, and the output says why; with none left the
    version serves TorchScript. The packages the module's export compiled stand in for new
    compiles, so these take seconds."""
    def reuse(program, out_dir, shape=ANY_SHAPE, quantized=False, max_batch=64, host=False,
              torchscript=None):
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact / shape.file, out_dir / shape.file)
        low, high = (shape.batch, shape.batch) if shape.batch else (1, max_batch)
        return compiled_mod.Compiled(out_dir / shape.file, torch.__version__, "AVX2", "x86_64", low, high, 1.0,
                                     compiled_mod.check_library(out_dir / shape.file), shape.threads,
                                     PACKED_AT_LOAD if shape.batch else None, weights=artifact / WEIGHTS_FILE)

    real_check = cli.parity.check

    def compiled_disagrees(learn, module, steps, files, temperature=1.0, also=()):
        report = real_check(learn, module, steps, files, temperature, also)
        if not isinstance(module, torch.jit.ScriptModule):  # a package's runner
            report.max_abs_diff = 0.5
        return report

    def broken(program, out_dir, shape=ANY_SHAPE, quantized=False, max_batch=64, host=False,
               torchscript=None):
        raise compiled_mod.CompileError(f"AOTInductor failed on {shape.name}: g++ exited 1")

    def b1t2_broken(program, out_dir, shape=ANY_SHAPE, quantized=False, max_batch=64,
                    host=False, torchscript=None):
        if shape.name == "b1t2":
            return broken(program, out_dir, shape)
        return reuse(program, out_dir, shape, quantized, max_batch)

    kept = []
    if failure == "parity":
        monkeypatch.setattr(cli.compiled, "compile_package", reuse)
        monkeypatch.setattr(cli.parity, "check", compiled_disagrees)
        expected = ["its parity check failed"]
    elif failure == "compile":
        monkeypatch.setattr(cli.compiled, "compile_package", broken)
        expected = [f"export: no compiled {name} package, its passes will run on the next runtime: "
                    f"AOTInductor failed on {name}: g++ exited 1" for name in SHAPES]
    elif failure == "one shape":
        monkeypatch.setattr(cli.compiled, "compile_package", b1t2_broken)
        expected = ["export: no compiled b1t2 package, its passes will run on the next runtime: AOTInductor failed on "
                    "b1t2: g++ exited 1"]
        kept = ["b1-64", "b1t1"]
    else:
        monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, no c++
        monkeypatch.delenv("CXX", raising=False)
        expected = ["no C++ compiler"]
    out = tmp_path / "models"
    assert cli.main([str(learner), "--out", str(out), "--images", str(CARS), "--parity-images", "4",
                     "--checks", "2"]) == 0
    printed = capsys.readouterr().out
    assert all(line in printed for line in expected), printed
    assert ("export: no compiled package, the artifact serves TorchScript only" in printed) == (not kept)
    version = out / ModelFolder(out).current()
    assert sorted(p.shape for p in Manifest.read(version).compiled) == kept
    assert sorted(p.name for p in version.glob("*.pt2")) == sorted(SHAPES[name][0] for name in kept)
    served = load_artifact(version)
    assert served.runtime.name == ("compiled" if kept else "torchscript")
    served.close()


def test_int8_package_is_kept_only_within_a_point_of_float_accuracy(learner, tmp_path, capsys):
    """The tiny learner's few validation photos make either outcome possible; each must be consistent."""
    out = tmp_path / "int8"
    code = cli.main([str(learner), "--out", str(out), "--images", str(CARS), "--parity-images", "4", "--checks", "2",
                     "--quantize", "int8", "--calibration-images", "16"])
    printed = capsys.readouterr()
    verdict = [line for line in printed.out.splitlines() if line.startswith("int8: validation top-1 ")]
    assert len(verdict) == 1, printed.out + printed.err
    int8, float32 = (float(x) for x in re.findall(r"([0-9.]+) % \(", verdict[0]))  # as printed: int8 first
    if code == 0:
        assert verdict[0].endswith("kept") and float32 - int8 <= 1.0
        [entry] = Manifest.read(out / "1").data["files"]["compiled"]
        assert entry["quantization"] == "int8" and entry["int8"]["calibration_images"] == 16
        assert round(100 * entry["int8"]["int8_top1"], 1) == int8
        artifact = load_artifact(out / "1", runtime="compiled")
        assert artifact.runtime.name == "compiled"
        artifact.close()
    else:
        assert "refused" in verdict[0] and float32 - int8 > 1.0
        assert "nothing was added" in printed.err and not out.exists()


def test_int8_acceptance_rule():
    assert quantize.acceptable(quantize.Accuracy(190, 222), quantize.Accuracy(188, 222))      # 0.9 point lower
    assert not quantize.acceptable(quantize.Accuracy(190, 222), quantize.Accuracy(187, 222))  # 1.4 points lower
    assert quantize.acceptable(quantize.Accuracy(100, 100), quantize.Accuracy(99, 100))       # exactly 1 point
    assert not quantize.acceptable(quantize.Accuracy(0, 0), quantize.Accuracy(0, 0))


def test_leaves_artifact_for_the_cross_version_check(artifact):
    target = os.environ.get("WHATCAR_CROSS_DIR")
    if not target:
        pytest.skip("WHATCAR_CROSS_DIR not set (make test sets it)")
    target = Path(target)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(artifact, target / "artifact")
    loaded = load_artifact(target / "artifact", optimize=False, runtime="torchscript")
    # The server's own preprocessing, JPEG draft decoding included, as tests/cross uses it.
    preprocessor = Preprocessor(loaded.steps, 10**8)
    package = load_artifact(target / "artifact", runtime="compiled")
    # What each shape gives each photo under this (the exporting) torch, on its own thread count.
    rows, compiled_rows = {}, {p.shape: {} for p in package.runner.packages}
    before = torch.get_num_threads()
    for path in car_photos():
        pixels = preprocessor(path.read_bytes())
        with torch.no_grad():
            rows[str(path.relative_to(CARS))] = loaded.runner(pixels.unsqueeze(0))[0].tolist()
            for shape, runner in package.runner.runners.items():
                torch.set_num_threads(shape.threads or before)
                compiled_rows[shape.shape][str(path.relative_to(CARS))] = runner(pixels.unsqueeze(0))[0].tolist()
    torch.set_num_threads(before)
    package.close()
    (target / "expected.json").write_text(json.dumps({"torch": torch.__version__, "probabilities": rows,
                                                      "compiled_probabilities": compiled_rows}))
    weights_inside(target / "artifact", target / "format3")


def weights_inside(artifact: Path, out: Path) -> None:
    """The same model as a version exported before packages took their weights at load (manifest
    format 3, the b1t1 package holding its own weights, packed for oneDNN's AVX2 kernels), for
    tests/cross to serve: old versions must keep serving, and `make rollback` go back to them."""
    shutil.copytree(artifact, out, ignore=shutil.ignore_patterns("*.pt2", WEIGHTS_FILE))
    module = torch.jit.load(str(out / "model.pt")).eval()
    manifest = Manifest.read(out)
    program = compiled_mod.torchscript_program(module, *manifest.input_size, 1)
    built = compiled_mod.compile_package(program, out, compiled_mod.Shape(1, 1))
    data = dict(manifest.data, format_version=3, files=dict(manifest.data["files"]))
    data["files"].pop("weights", None)
    data["files"].pop("compiled")
    old = Manifest(data, str(out / "manifest.json"))
    old.add_compiled(out, built.path.name, torch=built.torch, cpu_capability=built.cpu_capability, arch=built.arch,
                     min_batch=1, max_batch=1, threads=1, onednn_isa=built.onednn_isa)
    old.write(out)
    assert built.onednn_isa == "AVX2" and built.weights is None


def test_triton_flag_adds_a_model_repository_to_the_export(learner, tmp_path):
    models = tmp_path / "with-triton"
    assert cli.main([str(learner), "--out", str(models), "--images", str(CARS), "--parity-images", "4",
                     "--triton", "--no-compiled"]) == 0
    out = models / "1"
    manifest = json.loads((out / "manifest.json").read_text())
    model_dir = out / "triton" / manifest["name"]
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "pytorch_libtorch"' in config and f"dims: [ {manifest['num_classes']} ]" in config
    assert sha256_file(model_dir / "1" / "model.pt") == manifest["files"]["model"]["sha256"]
    assert (model_dir / "labels.txt").read_bytes() == (out / "labels.txt").read_bytes()
    load_artifact(out)  # the server's check is not disturbed by the extra folder


def test_without_acceptance_the_module_returns_probabilities_alone(learner, tmp_path):
    out = tmp_path / "plain"
    assert cli.main([str(learner), "--out", str(out), "--images", str(CARS), "--parity-images", "4",
                     "--no-acceptance"]) == 0
    manifest = Manifest.read(out / "1")
    assert manifest.extra_outputs == [] and manifest.acceptance is None and "calibration" not in manifest.data
    loaded = load_artifact(out / "1")
    assert loaded.runner(torch.zeros((2, 3, SIZE, SIZE), dtype=torch.uint8)).shape == (2, 3)


def test_calibration_needs_the_training_photos(learner, tmp_path, capsys):
    moved = tmp_path / "elsewhere"
    shutil.copy(learner, moved.with_suffix(".pkl"))
    info = json.loads(learner.with_name("export.pkl.json").read_text())
    write_sidecar(moved.with_suffix(".pkl"), {**info, "data": str(tmp_path / "gone")})
    assert cli.main([str(moved.with_suffix(".pkl")), "--out", str(tmp_path / "out"), "--images", str(CARS)]) == 1
    assert "--no-acceptance" in capsys.readouterr().err
