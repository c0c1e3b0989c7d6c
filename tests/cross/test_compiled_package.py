"""The compiled packages tests/export built under the train side's torch, served under this side's.

The packages (one per shape: batch 1 on 1 thread, batch 1 on 2, any batch) are machine code for
AVX2 CPUs, built by torch 2.14 with a C++ compiler; here each must load with torch 2.13 and no
compiler, answer like the TorchScript module on real photos, and be passed over (with the
reason logged) or refused exactly when the rules say so.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from serve.model.artifact import ArtifactError, load_artifact
from serve.model.handler import load_handler
from serve.model.manifest import Manifest, sha256_file
from serve.model.preprocess import Preprocessor
from serve.model.runtime.compiled import CompiledLibrary, PackageError, open_package
from serve.model.runtime.plan import PassPlan
from serve.model.runtime.shapes import ShapedRunner
from serve.model.runtime.weights import (
    CONSTANTS,
    WEIGHTS_FILE,
    Constant,
    WeightsMismatch,
    read_constants_list,
    write_constants_list,
)
from serve.model.settings import InferenceSettings
from tests.support.paths import CARS, ROOT
from tests.support.server import request, start_server


@pytest.fixture()
def copy(cross_dir, tmp_path) -> Path:
    folder = tmp_path / "artifact"
    shutil.copytree(cross_dir / "artifact", folder)
    return folder


def edit_package_entry(folder: Path, file: str | None = None, **changes) -> None:
    """Change the manifest's entry of the package in `file`, or of every package."""
    manifest = Manifest.read(folder)
    for entry in manifest.data["files"]["compiled"]:
        if file is None or entry["file"] == file:
            entry.update(changes)
    manifest.write(folder)


def test_every_package_built_by_the_train_torch_runs_here_like_torchscript(cross_dir):
    expected = json.loads((cross_dir / "expected.json").read_text())
    packages = Manifest.read(cross_dir / "artifact").compiled
    assert sorted(p.shape for p in packages) == sorted(expected["compiled_probabilities"]) == ["b1-64", "b1t1", "b1t2"]
    for package in packages:
        assert package.torch == expected["torch"]
        assert package.torch.split("+")[0] != torch.__version__.split("+")[0], "the cross check would prove nothing"
    compiled = load_artifact(cross_dir / "artifact", runtime="compiled")
    scripted = load_artifact(cross_dir / "artifact", runtime="torchscript")
    assert isinstance(compiled.runner, ShapedRunner) and compiled.module is None
    preprocessor = Preprocessor(compiled.steps, 10**8)
    names = sorted(expected["probabilities"])
    assert len(names) == 24
    pixels = torch.stack([preprocessor((CARS / name).read_bytes()) for name in names])
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            theirs = scripted.runner(pixels)
            for package, runner in compiled.runner.runners.items():
                # Each shape on the thread count it was built for, one image a pass when static.
                torch.set_num_threads(package.threads or before)
                assert compiled.runner.ran(1) == package.shape or not package.static
                ours = torch.cat([runner(pixels[i:i + 1]) for i in range(len(names))]) if package.static \
                    else runner(pixels)
                there = torch.tensor([expected["compiled_probabilities"][package.shape][name] for name in names])
                assert torch.equal(ours.argmax(dim=1), theirs.argmax(dim=1)), package.shape
                assert float((ours - theirs).abs().max()) < 1e-4, \
                    f"{package.shape} vs TorchScript, both under this torch"
                assert float((ours - there).abs().max()) < 1e-4, f"{package.shape} under the exporting torch"
    finally:
        torch.set_num_threads(before)
    compiled.close()


def test_the_server_serves_the_package_with_no_compiler_on_path(cross_dir, tmp_path, monkeypatch):
    """`python -m serve` with nothing that compiles C reachable: it loads the package, proves it on
    the check photos, and scores a photo as the exporter saw it."""
    empty = tmp_path / "bin"
    empty.mkdir()
    for name in ("CC", "CXX", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    environ = {"PATH": str(empty), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    probe = subprocess.run([sys.executable, "-c", "import shutil; print([shutil.which(c) for c in "
                            "('gcc', 'g++', 'cc', 'c++', 'clang')])"], env={**os.environ, **environ},
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[None, None, None, None, None]"
    server = start_server(cross_dir / "artifact", tmp_path / "serve.log", environ=environ)
    try:
        status, _, body = request(server.port, "GET", "/metadata")
        assert status == 200 and json.loads(body)["runtime"]["name"] == "compiled"
        # A lone request runs on the solo thread's shape: one image on two threads.
        expected = json.loads((cross_dir / "expected.json").read_text())["compiled_probabilities"]["b1t2"]
        name, row = next(iter(expected.items()))
        status, _, body = request(server.port, "POST", "/predict?top_k=1", (CARS / name).read_bytes(),
                               {"Content-Type": "image/jpeg"})
        labels = (cross_dir / "artifact" / "labels.txt").read_text().splitlines()
        # The row's probabilities come first; the familiarity column after them is no class.
        assert status == 200 and json.loads(body)["predictions"][0]["label"] == labels[max(range(len(labels)),
                                                                                             key=row.__getitem__)]
    finally:
        server.stop()
    log = server.output()
    assert log.count(" runs on compiled: b1t1 on b1t1, b1t2 on b1t2; packages compiled by torch ") == 1
    assert not (tmp_path / "inductor-cache").exists(), "loading compiled something"


def load_in_subprocess(folder: Path, environ: dict) -> tuple[dict, str]:
    """load_handler, as the server calls it, in a fresh process with `environ` (ATEN_CPU_CAPABILITY is
    read when torch starts); returns the runtime it chose and what it logged."""
    script = ("import json, logging, sys; from pathlib import Path; "
              "from serve.model.settings import InferenceSettings; "
              "from serve.model.handler import load_handler; logging.basicConfig(level=logging.INFO); "
              f"folder = Path({str(folder)!r}); "
              "s = load_handler(folder, '1', InferenceSettings(model_dir=folder, inference_workers=1), "
              "require_checks=True); "
              "print(json.dumps(s.artifact.runtime.as_dict())); s.close()")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **environ},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("marked, host, reason", [
    ("AVX512", "avx2", "needs a CPU with AVX512 and this one offers AVX2"),    # an AVX-512 package on an AVX2-only CPU
    ("AVX2", "default", "needs a CPU with AVX2 and this one offers DEFAULT"),  # the real package on a CPU without AVX2
])
def test_a_package_for_a_wider_cpu_than_this_one_falls_back_with_one_line(copy, marked, host, reason):
    if marked != "AVX2":
        edit_package_entry(copy, cpu_capability=marked)
    runtime, log = load_in_subprocess(copy, {"ATEN_CPU_CAPABILITY": host})
    assert runtime["name"] == "torchscript" and reason in runtime["reason"]
    lines = [line for line in log.splitlines() if " runs on " in line]
    assert len(lines) == 1 and lines[0].startswith("WARNING:whatcar:") and reason in lines[0]


def test_one_package_for_a_wider_cpu_is_passed_over_alone_with_one_line_naming_it(copy):
    edit_package_entry(copy, "model-b1t1.pt2", cpu_capability="AVX512")
    runtime, log = load_in_subprocess(copy, {"ATEN_CPU_CAPABILITY": "avx2"})
    # The one pass this configuration plans (one image, one thread) runs on the dynamic package.
    assert runtime["name"] == "compiled" and runtime["reason"].startswith("b1t1 on b1-64; ")
    warnings = [line for line in log.splitlines() if line.startswith("WARNING:whatcar:")]
    assert warnings == [
        "WARNING:whatcar:compiled b1t1 not used, its passes go to the next runtime: the compiled package needs a CPU "
        "with AVX512 and this one offers AVX2",
        "WARNING:whatcar:no compiled b1t1 package: passes of 1 image(s) on 1 thread(s) run on b1-64"]


def test_weights_packed_at_load_fit_wider_kernels_and_those_packed_for_avx2_are_passed_over(copy, cross_dir, tmp_path):
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("needs a CPU with AVX-512, where oneDNN would pick kernels other than AVX2 ones")
    runtime, log = load_in_subprocess(copy, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
    assert runtime["name"] == "compiled" and "not used" not in log, log
    old = tmp_path / "format3"
    shutil.copytree(cross_dir / "format3", old)
    runtime, log = load_in_subprocess(old, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
    assert runtime["name"] == "torchscript"
    assert "its weights are packed for oneDNN's AVX2 kernels and oneDNN runs AVX512_CORE ones here" in log


def test_a_package_from_an_incompatible_torch_falls_back_or_is_refused(copy, caplog):
    # Built three releases before the serving 2.13: beyond even the two that weights packed at load allow.
    edit_package_entry(copy, torch="2.10.0")
    with caplog.at_level(logging.INFO, logger="whatcar"):
        handler = load_handler(copy, "1", InferenceSettings(model_dir=copy, inference_workers=1), require_checks=True)
    assert handler.artifact.runtime.name == "torchscript"
    handler.close()
    lines = [r for r in caplog.records if " runs on " in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "built by torch 2.10.0" in lines[0].getMessage()
    with pytest.raises(ArtifactError, match="--runtime compiled cannot be served: .*built by torch 2.10.0"):
        load_artifact(copy, runtime="compiled")


def test_a_tampered_package_is_refused_like_a_tampered_model(copy, caplog):
    package = copy / "model-b1t1.pt2"
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the compiled library, which the zip stores as it is
    package.write_bytes(bytes(data))
    for runtime in ("auto", "compiled", "torchscript"):
        with pytest.raises(ArtifactError, match="model-b1t1.pt2 sha256 is .*the manifest says"):
            load_artifact(copy, runtime=runtime)
    # Listed with the damaged file's own checksum, it still does not load: the zip's CRC catches it
    # (torch's C++ loader would have run it). The pass it was for goes to the dynamic package.
    from serve.model.manifest import sha256_file
    edit_package_entry(copy, "model-b1t1.pt2", sha256=sha256_file(package))
    with caplog.at_level(logging.WARNING, logger="whatcar"):
        artifact = load_artifact(copy, runtime="auto")
    assert artifact.runtime.name == "compiled" and artifact.runtime.reason.startswith("b1t1 on b1-64; ")
    artifact.close()
    failed, missing = [r.getMessage() for r in caplog.records]
    assert failed.startswith("compiled b1t1 not used, its passes go to the next runtime: it failed to load: ")
    assert "Bad CRC-32" in failed
    assert missing == "no compiled b1t1 package: passes of 1 image(s) on 1 thread(s) run on b1-64"
    with pytest.raises(ArtifactError, match="--runtime compiled cannot be served: b1t1: .*Bad CRC-32"):
        load_artifact(copy, runtime="compiled")


def test_check_photos_are_scored_by_the_compiled_runtime(cross_dir, caplog):
    folder = cross_dir / "artifact"
    settings = InferenceSettings(model_dir=folder, inference_workers=2, solo_threads=2, micro_batch=2)
    with caplog.at_level(logging.INFO, logger="whatcar"):
        handler = load_handler(folder, "1", settings, require_checks=True)
    try:
        assert handler.artifact.runtime.name == "compiled" and isinstance(handler.artifact.runner, ShapedRunner)
        loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
        assert len(loaded) == 1 and " on compiled in " in loaded[0] and "6 check photos agree" in loaded[0]
    finally:
        handler.close()


def test_loading_a_package_again_reuses_its_library(cross_dir):
    """glibc cannot unload a package's library, so each load would map (and page in) another copy;
    a reload of the same package must reuse the one already loaded, and its models stay apart."""
    def mapped_libraries() -> set[str]:
        return {line.split(None, 5)[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "whatcar-compiled-" in line}

    path = cross_dir / "artifact" / "model.pt2"
    with pytest.raises(PackageError, match="takes its weights at load and none were given"):
        CompiledLibrary(path, runners=1)
    first = open_package(path)
    before = mapped_libraries()
    second = open_package(path)
    assert before and mapped_libraries() == before and first._lib is second._lib
    images = torch.randint(0, 256, (1, 3, *Manifest.read(cross_dir / "artifact").input_size), dtype=torch.uint8)
    with torch.inference_mode():
        expected = first(images)[0]
        first.close()  # the other model, from the same library, keeps working
        assert torch.equal(second(images)[0], expected)
    second.close()


def test_packages_take_their_weights_from_model_pt_and_the_one_weights_file(cross_dir):
    """A version stores its weights once: each package is code, and its constants are model.pt's
    tensors (and the weights file's few others), in this process's memory, not the package's."""
    folder = cross_dir / "artifact"
    model_bytes = (folder / "model.pt").stat().st_size
    extra = (folder / WEIGHTS_FILE).stat().st_size if (folder / WEIGHTS_FILE).is_file() else 0
    assert extra < model_bytes / 4
    for package in Manifest.read(folder).compiled:
        assert package.weights == "at load" and package.bytes < model_bytes / 2
        assert read_constants_list(folder / package.file)
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    # model.pt, a few code-only packages and the small weights file: well under two copies of the weights.
    assert total < 2 * model_bytes


def test_a_weights_file_that_is_not_the_versions_stops_the_load_naming_it(copy):
    weights = copy / WEIGHTS_FILE
    if not weights.is_file():
        pytest.skip("this export needed no weights beyond model.pt's")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_FILE} sha256 is .*the manifest says"):
        load_artifact(copy, runtime="auto")
    # The manifest brought into line with the damaged file: the tensor no longer has its name.
    manifest = Manifest.read(copy)
    manifest.add_file(copy, "weights", WEIGHTS_FILE)
    manifest.write(copy)
    for runtime in ("auto", "compiled"):
        with pytest.raises(WeightsMismatch, match=f"{WEIGHTS_FILE}: the tensor filed under"):
            load_artifact(copy, runtime=runtime)


def test_a_package_whose_constants_do_not_fit_the_version_stops_the_load_naming_it(copy):
    package = copy / "model-b1t1.pt2"
    listed = read_constants_list(package)
    first = listed[0]
    wrong = [Constant(**{**first.__dict__, "shape": (*first.shape, 1), "stride": (*first.stride, 1)}), *listed[1:]]
    rewritten = copy / "rewritten.pt2"
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(rewritten, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith(CONSTANTS):
                target.writestr(item, source.read(item.filename))
    write_constants_list(rewritten, wrong)
    rewritten.replace(package)
    edit_package_entry(copy, "model-b1t1.pt2", sha256=sha256_file(package), bytes=package.stat().st_size)
    with pytest.raises(WeightsMismatch, match=f"model-b1t1.pt2: constant {first.name} is torch.float32 .* but "
                                              "model.pt"):
        load_artifact(copy, runtime="auto", plan=PassPlan())


def test_a_version_exported_with_weights_inside_its_packages_still_serves(cross_dir, tmp_path):
    """Format 3: the package holds its weights, packed for oneDNN's AVX2 kernels, and no weights
    file exists. It serves as before, and a rollback to it works: see tests/serve/test_reload.py
    for the swap itself."""
    old = cross_dir / "format3"
    manifest = Manifest.read(old)
    assert manifest.data["format_version"] == 3 and not manifest.has_weights_file
    [package] = manifest.compiled
    assert package.weights is None and read_constants_list(old / package.file) is None
    expected = json.loads((cross_dir / "expected.json").read_text())
    served = load_artifact(old, runtime="compiled", plan=PassPlan())
    preprocessor = Preprocessor(served.steps, 10**8)
    name = sorted(expected["probabilities"])[0]
    with torch.inference_mode():
        row = served.runner.runner_for(package)(preprocessor((CARS / name).read_bytes()).unsqueeze(0))[0]
    served.close()
    assert float((row - torch.tensor(expected["probabilities"][name])).abs().max()) < 1e-4
    # Both kinds side by side in one model folder, as after an export following an older one.
    models = tmp_path / "models"
    shutil.copytree(old, models / "1")
    shutil.copytree(cross_dir / "artifact", models / "2")
    for version in ("1", "2"):
        loaded = load_artifact(models / version, runtime="compiled", plan=PassPlan())
        assert loaded.runtime.name == "compiled"
        loaded.close()
