"""make compile (export/host.py): the default model's packages built again for this CPU from its
model.pt, checked against it, added as a new version that a server runs on those packages with
oneDNN left to pick this CPU's kernels; and a refusal that leaves the model folder as it was."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from serve.model import onednn
from serve.model.runtime.choice import PACKED_AT_LOAD
from serve.model.runtime.loading import cpu_model
from serve.model.versions import VersionFolder
from tests.support.paths import ARTIFACT, ROOT, car_photos
from tests.support.server import Client, clean_env, start_server

COMPILE_TIMEOUT = 900  # three shapes, 20-80 s each on a busy 2-core machine


@pytest.fixture(scope="module", autouse=True)
def onednn_as_an_operator_leaves_it():
    """tests/export/conftest.py caps this process's oneDNN for the portable packages; the commands
    here must start as they do for an operator who set nothing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(onednn.VARIABLE, raising=False)
        yield


def run_host_compile(model_dir):
    return subprocess.run([sys.executable, "-m", "export.host", "--model-dir", str(model_dir)], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=COMPILE_TIMEOUT)


def copy_of_default(model_dir):
    model_dir.mkdir()
    shutil.copytree(ARTIFACT, model_dir / "1")
    (model_dir / "current").symlink_to("1")
    return model_dir


@pytest.fixture(scope="module")
def compiled_here(tmp_path_factory):
    model_dir = copy_of_default(tmp_path_factory.mktemp("host") / "models")
    done = run_host_compile(model_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return model_dir, done


def test_every_shape_is_built_for_this_cpu_and_agrees_with_model_pt(compiled_here):
    model_dir, done = compiled_here
    models = VersionFolder(model_dir)
    assert models.current() == "2" and models.previous() == "1"
    before = json.loads((model_dir / "1" / "manifest.json").read_text())
    after = json.loads((model_dir / "2" / "manifest.json").read_text())
    capability = torch.backends.cpu.get_cpu_capability()
    shapes = {(e["batch"]["min"], e["batch"]["max"], e["threads"]) for e in before["files"]["compiled"]}
    assert {(e["batch"]["min"], e["batch"]["max"], e["threads"]) for e in after["files"]["compiled"]} == shapes
    for package in after["files"]["compiled"]:
        assert package["built_for"] == cpu_model() and package["cpu_capability"] == capability
        # Packed at load, by the server's own oneDNN: nothing in the package is laid out for one ISA.
        assert package["onednn_isa"] == (PACKED_AT_LOAD if package["threads"] else None)
        assert package["weights"] == "at load"
        assert package["parity"]["passed"] and package["parity"]["images"] == len(before["checks"])
        assert package["torch"] == torch.__version__
        assert (model_dir / "2" / package["file"]).stat().st_size == package["bytes"]
    # Everything else is the version it was built from.
    assert after["files"]["model"] == before["files"]["model"] and after["checks"] == before["checks"]
    assert after["host_compile"] == {"from_version": "1", "built_for": cpu_model(), "torch": torch.__version__}
    assert done.stdout.count("check photos agree with model.pt") == len(shapes)
    assert done.stdout.strip().splitlines()[-1].startswith("version 2 of ")


def test_a_server_runs_the_hosts_packages_and_answers_as_the_portable_ones(compiled_here, tmp_path):
    model_dir, _ = compiled_here
    photo = car_photos()[0].read_bytes()
    answers = {}
    for version in ("1", "2"):
        single = tmp_path / f"v{version}"
        shutil.copytree(model_dir / version, single / version)
        (single / "current").symlink_to(version)
        with start_server(single, tmp_path / f"server-{version}.log", "--runtime", "compiled") as server:
            answers[version] = Client.of(server).predict(photo)
            log = server.output()
        assert "runs on compiled: b1t1 on b1t1, b1t2 on b1t2" in log
    kernels = torch.backends.cpu.get_cpu_capability()
    assert f"(oneDNN kernels: {kernels})" in log  # uncapped for version 2's packages
    got, want = answers["2"], answers["1"]
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
    assert got["predictions"][0]["probability"] == pytest.approx(want["predictions"][0]["probability"], abs=1e-3)


def test_a_version_without_packages_is_refused_and_left_as_it_was(tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    shutil.copytree(ARTIFACT, model_dir / "1", ignore=shutil.ignore_patterns("*.pt2"))
    manifest = json.loads((model_dir / "1" / "manifest.json").read_text())
    del manifest["files"]["compiled"]
    (model_dir / "1" / "manifest.json").write_text(json.dumps(manifest))
    (model_dir / "current").symlink_to("1")
    done = run_host_compile(model_dir)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"make compile: version 1 has no compiled package to build for this host; {model_dir} is unchanged"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "current"]
