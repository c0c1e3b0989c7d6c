"""The manifest check: a damaged or mismatched artifact is refused with a reason."""

import json
import shutil

import pytest

from serve.model.artifact import ArtifactError, load_artifact, sha256_file
from tests.support.paths import ARTIFACT


@pytest.fixture()
def copy(tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(ARTIFACT, folder)
    return folder


def rewrite_manifest(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_committed_artifact_loads(copy):
    artifact = load_artifact(copy, optimize=False)
    assert len(artifact.labels) == artifact.manifest.num_classes
    assert artifact.sha256 == sha256_file(copy / "model.pt")


def test_the_committed_default_ships_a_compiled_shape_for_each_default_pass_and_its_weights_once():
    """Batch 1 on 1 thread (the shared workers, make classify, the Ray actors) and on 2 (a request
    alone), the dynamic package for every other pass. The packages are code: their weights are
    model.pt's (and the small weights file's), so the version stays within 45 MB (it was 86 MB
    with a copy of the weights in each package), and no file is over 25 MB."""
    from serve.model.manifest import Manifest
    from serve.model.runtime.choice import PACKED_AT_LOAD
    from serve.model.runtime.plan import PassPlan
    from serve.model.runtime.shapes import choose_shape

    packages = Manifest.read(ARTIFACT).compiled
    assert {p.shape for p in packages} == {"b1t1", "b1t2", "b1-64"}
    defaults = PassPlan(workers=2, torch_threads=1, micro_batch=1, solo_threads=2)
    assert all(choose_shape(batch, threads, packages).static for batch, threads in defaults.passes())
    assert all(p.onednn_isa == PACKED_AT_LOAD for p in packages if p.static)
    assert all(p.weights == "at load" and p.bytes < 5_000_000 for p in packages)
    sizes = {f.name: f.stat().st_size for f in ARTIFACT.rglob("*") if f.is_file()}
    assert max(sizes.values()) <= 25_000_000, sizes
    assert sum(sizes.values()) <= 45_000_000, sizes


def test_edited_model_byte_is_detected(copy):
    model = copy / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(copy)


def test_edited_labels_are_detected(copy):
    labels = copy / "labels.txt"
    labels.write_text(labels.read_text().replace("a", "e", 1))
    with pytest.raises(ArtifactError, match="labels.txt sha256"):
        load_artifact(copy)


def test_wrong_label_count_is_detected_even_with_a_matching_checksum(copy):
    labels = copy / "labels.txt"
    labels.write_text(labels.read_text() + "Extra Car 2020\n")
    rewrite_manifest(copy, lambda m: m["files"]["labels"].update(sha256=sha256_file(labels)))
    with pytest.raises(ArtifactError, match="classes but the manifest says"):
        load_artifact(copy)
    rewrite_manifest(copy, lambda m: m.update(num_classes=m["num_classes"] + 1))
    with pytest.raises(ArtifactError, match="'classes' must list one entry for each of the"):
        load_artifact(copy)
    # With the class fields agreeing too, the model itself is found to answer for one class fewer.
    extra = {"label": "Extra Car 2020", "name": "Extra Car 2020", "make": "Extra", "model": "Car", "body": None,
             "year": 2020}
    rewrite_manifest(copy, lambda m: m["classes"].append(extra))
    with pytest.raises(ArtifactError, match="model outputs shape"):
        load_artifact(copy)


def test_newer_format_is_refused(copy):
    rewrite_manifest(copy, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format 99, newer than this server understands"):
        load_artifact(copy)


def test_missing_files_are_named(copy):
    (copy / "model.pt").unlink()
    with pytest.raises(ArtifactError, match="model file .*model.pt is missing"):
        load_artifact(copy)
    with pytest.raises(ArtifactError, match="manifest.json not found"):
        load_artifact(copy.parent / "nowhere")


def test_manifest_cannot_point_outside_its_folder(copy):
    shutil.copy(copy / "model.pt", copy.parent / "model.pt")
    rewrite_manifest(copy, lambda m: m["files"]["model"].update(file="../model.pt"))
    with pytest.raises(ArtifactError, match="not a file inside"):
        load_artifact(copy)


def test_preprocessing_must_produce_the_input_size(copy):
    rewrite_manifest(copy, lambda m: m["preprocessing"]["steps"][-1].update(height=7))
    with pytest.raises(ArtifactError, match="preprocessing produces 7x"):
        load_artifact(copy)


def test_unknown_preprocessing_op_is_refused(copy):
    rewrite_manifest(copy, lambda m: m["preprocessing"]["steps"].append({"op": "sharpen"}))
    with pytest.raises(ArtifactError, match="unknown op 'sharpen'"):
        load_artifact(copy)


def test_not_torchscript_is_refused(copy):
    model = copy / "model.pt"
    model.write_bytes(b"not a zip archive at all")
    rewrite_manifest(copy, lambda m: m["files"]["model"].update(sha256=sha256_file(model)))
    with pytest.raises(ArtifactError, match="not a loadable TorchScript module"):
        load_artifact(copy, runtime="torchscript")


def test_the_start_up_account_says_where_the_packages_weights_came_from(copy):
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the committed packages need a CPU with AVX2")
    artifact = load_artifact(copy, optimize=False)
    try:
        assert artifact.runtime.name == "compiled"
        assert "weights stored once, taken at load from model.pt and weights.safetensors and packed here for " \
               "oneDNN's" in artifact.runtime.reason
    finally:
        artifact.close()
