"""Which runtime serves: the start-up decision, the compiled runner's checks, the manifest entry,
and the committed (TorchScript-only) artifact's answers. Packages themselves are exercised in
tests/cross, with one that tests/export compiled."""

import json
import logging
import shutil

import pytest
import torch

from serve.artifact import ArtifactError, load_artifact
from serve.config import ConfigError, load_config
from serve.manifest import Manifest
from serve.runtime.choice import (
    PACKED_AT_LOAD,
    Host,
    RuntimeChoiceError,
    capability_ok,
    choose_runtime,
    package_problem,
    torch_ok,
)
from serve.runtime.compiled import CompiledRunner
from serve.runtime.rows import output_rows
from tests.support.paths import ARTIFACT, ARTIFACTS

PACKAGE = {"cpu_capability": "AVX2", "arch": "x86_64", "torch": "2.14.1+cu130"}
EPYC = Host(cpu_capability="AVX2", arch="x86_64", torch="2.13.0+cpu")


@pytest.mark.parametrize("package, host, ok", [
    ("AVX2", "AVX2", True), ("AVX2", "AVX512", True), ("AVX512", "AVX2", False), ("AVX2", "DEFAULT", False),
    ("DEFAULT", "DEFAULT", True), ("AVX512", "AVX512", True),
    # Names outside the x86 order only match themselves.
    ("SVE256", "SVE256", True), ("AVX2", "SVE256", False), ("AMX9000", "AVX512", False),
])
def test_a_package_runs_only_on_a_cpu_offering_at_least_its_capability(package, host, ok):
    assert capability_ok(package, host) is ok


@pytest.mark.parametrize("compiled, serving, ok", [
    ("2.14.1+cu130", "2.13.0+cpu", True),   # the pair whatcar exports and serves with, one way
    ("2.13.0+cpu", "2.14.1+cu130", True),   # and the other: the export checks parity under 2.14
    ("2.14.1+cu130", "2.14.0", True),
    ("2.14.1", "2.12.0", False),            # two releases back
    ("2.13.0", "2.15.0", False),            # two releases on: not proven here
    ("2.14.1", "3.13.0", False),
    ("2.14.1", "nightly", False),
])
def test_torch_rule_accepts_the_compiling_release_and_those_next_to_it(compiled, serving, ok):
    assert torch_ok(compiled, serving) is ok


@pytest.mark.parametrize("compiled, serving, ok", [
    ("2.13.0+cpu", "2.15.0+cu130", True),   # two releases on: no oneDNN blob to misread
    ("2.13.0+cpu", "2.16.0", False),        # three: never run
    ("2.14.1", "2.12.0", False),            # back stays one release
    ("2.13.0", "3.0.0", False),
])
def test_packages_whose_weights_are_packed_at_load_are_accepted_two_releases_on(compiled, serving, ok):
    assert torch_ok(compiled, serving, packed_at_load=True) is ok


def test_a_package_packed_at_load_fits_whatever_kernels_onednn_runs_here():
    at_load = {**PACKAGE, "onednn_isa": PACKED_AT_LOAD, "weights": "at load", "torch": "2.13.0+cpu"}
    uncapped = Host(cpu_capability="AVX512", arch="x86_64", torch="2.15.0", onednn_isa="AVX512")
    assert package_problem(at_load, uncapped) is None
    assert "packed for oneDNN's AVX2 kernels" in package_problem({**at_load, "onednn_isa": "AVX2", "weights": None,
                                                                  "torch": "2.14.1"}, uncapped)


def test_auto_serves_the_package_when_this_host_can():
    choice = choose_runtime("auto", PACKAGE, EPYC)
    assert choice.name == "compiled" and "AVX2 package" in choice.reason and "2.13.0+cpu" in choice.reason


@pytest.mark.parametrize("package, host, reason", [
    (None, EPYC, "the artifact has no compiled package"),
    ({**PACKAGE, "cpu_capability": "AVX512"}, EPYC, "needs a CPU with AVX512 and this one offers AVX2"),
    (PACKAGE, Host("DEFAULT", "x86_64", "2.13.0"), "offers DEFAULT"),
    ({**PACKAGE, "torch": "2.11.0"}, EPYC, "built by torch 2.11.0"),
    (PACKAGE, Host("DEFAULT", "aarch64", "2.13.0"), "is for x86_64 and this host is aarch64"),
])
def test_auto_falls_back_to_torchscript_saying_why(package, host, reason):
    choice = choose_runtime("auto", package, host)
    assert choice.name == "torchscript" and choice.reason.startswith("compiled package not used: ")
    assert reason in choice.reason


def test_compiled_makes_a_fallback_an_error_and_torchscript_needs_no_package():
    with pytest.raises(RuntimeChoiceError, match="--runtime compiled cannot be served: .*needs a CPU with AVX512"):
        choose_runtime("compiled", {**PACKAGE, "cpu_capability": "AVX512"}, EPYC)
    assert choose_runtime("compiled", PACKAGE, EPYC).name == "compiled"
    choice = choose_runtime("torchscript", PACKAGE, EPYC)
    assert choice.name == "torchscript" and "asked for" in choice.reason
    with pytest.raises(ValueError, match="unknown runtime"):
        choose_runtime("fast", PACKAGE, EPYC)


def test_runtime_setting_is_validated_at_start_up():
    assert load_config(["--model-dir", str(ARTIFACTS)], environ={}).runtime == "auto"
    assert load_config(["--model-dir", str(ARTIFACTS)], environ={"WHATCAR_RUNTIME": "compiled"}).runtime == "compiled"
    assert load_config(["--model-dir", str(ARTIFACTS), "--runtime", "torchscript"],
                       environ={"WHATCAR_RUNTIME": "compiled"}).runtime == "torchscript"
    with pytest.raises(ConfigError, match="runtime must be auto, compiled, torchscript .*WHATCAR_RUNTIME"):
        load_config(["--model-dir", str(ARTIFACTS)], environ={"WHATCAR_RUNTIME": "onnx"})


# ---------------------------------------------------------------------- what a runner returns


def test_outputs_become_one_row_per_image():
    probabilities, familiarity = torch.rand(3, 5), torch.rand(3)
    assert output_rows(probabilities) is probabilities
    assert output_rows((probabilities,)) is probabilities
    rows = output_rows((probabilities, familiarity))
    assert rows.shape == (3, 6) and torch.equal(rows[:, :5], probabilities) and torch.equal(rows[:, 5], familiarity)
    assert output_rows([probabilities, torch.rand(3, 2), torch.rand(3, 1)]).shape == (3, 8)


class Recorder:
    """Stands in for a loaded package: records the batch sizes it is given, answers like one."""

    def __init__(self):
        self.batches = []

    def __call__(self, images):
        self.batches.append(images.shape[0])
        assert images.is_contiguous()
        return [images.float().mean(dim=(1, 2, 3)).unsqueeze(1).repeat(1, 3), torch.ones(images.shape[0])]


def test_compiled_runner_checks_every_batch_before_the_package_sees_it():
    runner = CompiledRunner(Recorder(), 8, 8, min_batch=1, max_batch=4)
    good = torch.zeros((2, 3, 8, 8), dtype=torch.uint8)
    assert runner(good).shape == (2, 4)
    for bad, message in [(good.float(), "uint8"), (torch.zeros((2, 3, 8, 9), dtype=torch.uint8), r"\[N, 3, 8, 8\]"),
                         (torch.zeros((3, 8, 8), dtype=torch.uint8), r"\[N, 3, 8, 8\]"),
                         (torch.zeros((0, 3, 8, 8), dtype=torch.uint8), "at least 1 images")]:
        with pytest.raises(ValueError, match=message):
            runner(bad)
    assert runner.model.batches == [2]


def test_compiled_runner_splits_batches_above_the_package_range_and_makes_them_dense():
    recorder = Recorder()
    runner = CompiledRunner(recorder, 8, 8, min_batch=1, max_batch=4)
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 8, 8)  # strided, not dense
    rows = runner(images)
    assert recorder.batches == [4, 4, 2]
    assert torch.equal(rows[:, 0], torch.arange(10, dtype=torch.float32)) and rows.shape == (10, 4)


# ---------------------------------------------------------------------- the manifest entry


def manifest_with(entry) -> Manifest:
    data = json.loads((ARTIFACT / "manifest.json").read_text())
    data["files"]["compiled"] = entry
    return Manifest(data)


ENTRY = {"file": "model.pt2", "sha256": "ab" * 32, "bytes": 20_000_000, "torch": "2.14.1+cu130",
         "cpu_capability": "AVX2", "arch": "x86_64", "batch": {"min": 1, "max": 64}, "quantization": None}


def test_manifest_reads_the_compiled_entry_format_2_wrote():
    [package] = manifest_with(ENTRY).compiled
    assert (package.file, package.torch, package.cpu_capability, package.min_batch, package.max_batch,
            package.threads, package.onednn_isa) == ("model.pt2", "2.14.1+cu130", "AVX2", 1, 64, None, None)
    assert package.requirements() == {**PACKAGE, "onednn_isa": None, "built_for": None, "weights": None}
    without = json.loads((ARTIFACT / "manifest.json").read_text())
    without["files"].pop("compiled", None)
    assert Manifest(without).compiled == []


@pytest.mark.parametrize("change", [
    lambda e: e.pop("cpu_capability"), lambda e: e.update(batch={"min": 5, "max": 2}),
    lambda e: e.update(bytes="many"), lambda e: e.update(torch=""), lambda e: e.pop("batch"),
])
def test_a_malformed_compiled_entry_is_refused(change):
    entry = json.loads(json.dumps(ENTRY))
    change(entry)
    with pytest.raises(ArtifactError, match="files.compiled"):
        _ = manifest_with(entry).compiled
    with pytest.raises(ArtifactError, match="files.compiled"):
        _ = manifest_with([entry]).compiled


def test_manifest_lists_a_package_with_its_checksum(tmp_path):
    manifest = Manifest(json.loads((ARTIFACT / "manifest.json").read_text()))
    manifest.data["files"].pop("compiled")
    (tmp_path / "model.pt2").write_bytes(b"package bytes")
    package = manifest.add_compiled(tmp_path, "model.pt2", torch="2.14.1", cpu_capability="AVX2", arch="x86_64",
                                    min_batch=1, max_batch=64, parity={"passed": True})
    assert package.bytes == 13 and manifest.data["files"]["compiled"][0]["parity"] == {"passed": True}
    assert manifest.verified_packages(tmp_path) == [(package, tmp_path / "model.pt2")]
    (tmp_path / "model.pt2").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="model.pt2 sha256 is"):
        manifest.verified_packages(tmp_path)


# ---------------------------------------------------------------------- the committed artifact


@pytest.fixture()
def copy(tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(ARTIFACT, folder)
    return folder


def test_an_artifact_without_a_package_serves_torchscript(copy):
    manifest = Manifest.read(copy)
    manifest.data["files"].pop("compiled", None)
    manifest.write(copy)
    artifact = load_artifact(copy, optimize=False)
    assert artifact.runtime.name == "torchscript" and artifact.module is not None
    assert artifact.runtime.reason == "compiled package not used: the artifact has no compiled package"
    with pytest.raises(ArtifactError,
                       match="--runtime compiled cannot be served: the artifact has no compiled package"):
        load_artifact(copy, runtime="compiled")


def test_a_listed_package_is_verified_even_when_torchscript_serves(copy):
    manifest = Manifest.read(copy)
    (copy / "model.pt2").write_bytes(b"not the package the manifest lists")
    manifest.data["files"]["compiled"] = {**ENTRY, "sha256": "0" * 64}
    manifest.write(copy)
    for runtime in ("auto", "torchscript"):
        with pytest.raises(ArtifactError, match="model.pt2 sha256 is .* the manifest says 000000000000"):
            load_artifact(copy, runtime=runtime)


def test_a_package_that_does_not_load_leaves_torchscript_serving(copy, caplog):
    """A listed, intact file that is not a package: auto serves TorchScript and says why, compiled refuses."""
    manifest = Manifest.read(copy)
    manifest.data["files"].pop("compiled")
    (copy / "model.pt2").write_bytes(b"not a zip")
    manifest.add_compiled(copy, "model.pt2", torch=torch.__version__, cpu_capability="DEFAULT", arch=EPYC.arch,
                          min_batch=1, max_batch=64)
    manifest.write(copy)
    artifact = load_artifact(copy, optimize=False)
    assert artifact.runtime.name == "torchscript"
    assert artifact.runtime.reason.startswith("compiled package not used: it failed to load: ")
    assert "not a readable package" in artifact.runtime.reason
    with pytest.raises(ArtifactError, match="--runtime compiled cannot be served: .*not a readable package"):
        load_artifact(copy, runtime="compiled")


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the committed packages need a CPU with AVX2")
def test_one_package_that_does_not_load_leaves_its_passes_to_the_next_with_one_line(copy, caplog):
    from serve.scheduler import PassPlan

    manifest = Manifest.read(copy)
    (copy / "model-b1t2.pt2").write_bytes(b"not a zip")
    manifest.add_compiled(copy, "model-b1t2.pt2", torch=torch.__version__, cpu_capability="AVX2", arch=EPYC.arch,
                          min_batch=1, max_batch=1, threads=2, onednn_isa="AVX2")
    manifest.write(copy)
    plan = PassPlan(workers=2, torch_threads=1, micro_batch=1, solo_threads=2)
    with caplog.at_level(logging.WARNING, logger="whatcar"):
        artifact = load_artifact(copy, optimize=False, plan=plan)
    assert artifact.runtime.name == "compiled" and artifact.runtime.reason.startswith("b1t1 on b1t1, b1t2 on b1-64; ")
    artifact.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "not a readable package" in lines[0]
    assert lines[0].startswith("compiled b1t2 not used, its passes go to the next runtime: it failed to load: ")
    assert lines[1] == "no compiled b1t2 package: passes of 1 image(s) on 2 thread(s) run on b1-64"
    with pytest.raises(ArtifactError, match="^--runtime compiled cannot be served: b1t2: it failed to load: .*not a "
                                            "readable package"):
        load_artifact(copy, runtime="compiled", plan=plan)


def test_metadata_and_metrics_say_which_runtime_serves(client, handler):
    body = client.simulate_get("/metadata").json
    assert body["runtime"] == handler.artifact.runtime.as_dict()
    assert body["runtime"]["name"] in ("compiled", "torchscript") and body["runtime"]["reason"]
    metrics = client.simulate_get("/metrics").text
    assert f'whatcar_runtime_info{{name="{handler.artifact.runtime.name}",' in metrics
    platform = client.simulate_get(f"/v2/models/{handler.artifact.name}").json["platform"]
    assert platform == ("pytorch_aotinductor" if handler.artifact.runtime.name == "compiled" else "pytorch_torchscript")


def test_the_runtime_line_is_logged_once_at_load(tmp_path, caplog):
    from serve.config import Config
    from serve.handler import load_handler
    from tests.support.tiny_artifact import write_tiny_artifact

    folder = write_tiny_artifact(tmp_path / "tiny")
    with caplog.at_level(logging.INFO, logger="whatcar"):
        handler = load_handler(folder, "1", Config(model_dir=tmp_path, inference_workers=1))
    handler.close()
    lines = [r.getMessage() for r in caplog.records if " runs on " in r.getMessage()]
    assert lines == ["tiny-test version 1 runs on torchscript: compiled package not used: the artifact has no "
                     "compiled package"]
