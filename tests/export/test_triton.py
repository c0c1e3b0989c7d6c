"""The Triton model repository writer, checked without a Triton binary and without fastai.

config.pbtxt is read back with a small parser for protobuf's text format, and every name,
type and dimension in it is held against the manifest and against the TorchScript module
itself, run on a batch shaped as Triton would send it.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from export import triton
from serve.model.errors import ArtifactError
from serve.model.manifest import Manifest
from tests.support.paths import ROOT

HEIGHT, WIDTH, LABELS = 12, 16, ["Alfa Romeo Giulia 2017", "Citroen DS 1965", "Saab 900 1987", "Volvo 240 1993"]

TOKEN = re.compile(r'\s*(?:#[^\n]*|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format to a dict; a repeated field or a [list] becomes a Python list."""
    tokens, pos = [], 0
    while text[pos:].strip():
        match = TOKEN.match(text, pos)
        assert match, f"not protobuf text format at {text[pos:pos + 30]!r}"
        pos = match.end()
        string, punct, word = match.groups()
        if string is not None:
            tokens.append(("str", json.loads(string)))
        elif punct is not None:
            tokens.append(("punct", punct))
        elif word is not None:
            tokens.append(("word", int(word) if re.fullmatch(r"-?\d+", word) else word))
    pos = 0

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def value():
        kind, tok = take()
        if (kind, tok) == ("punct", "{"):
            return message("}")
        if (kind, tok) == ("punct", "["):
            items = []
            while tokens[pos] != ("punct", "]"):
                items.append(value())
                if tokens[pos] == ("punct", ","):
                    take()
            take()
            return items
        assert kind in ("str", "word"), (kind, tok)
        return tok

    def message(end):
        fields = {}
        while pos < len(tokens) and tokens[pos] != ("punct", end):
            kind, key = take()
            assert kind == "word", key
            if tokens[pos] == ("punct", ":"):
                take()
            got = value()
            if key in fields:  # a repeated field written once per element
                fields[key] = (fields[key] if isinstance(fields[key], list) else [fields[key]]) + [got]
            else:
                fields[key] = got
        if end != "":
            take()
        return fields

    return message("")


class Toy(nn.Module):
    """Takes uint8 [N, 3, H, W] and returns softmax [N, classes], like an exported model."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, len(LABELS))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(images.float().div(255).mean(dim=(2, 3))), dim=-1)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def renamed(manifest: Manifest, **changes) -> Manifest:
    return Manifest({**manifest.data, **changes})


@pytest.fixture()
def artifact(tmp_path) -> tuple[Path, Manifest]:
    folder = tmp_path / "toy"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.trace(Toy().eval(), torch.zeros((2, 3, HEIGHT, WIDTH), dtype=torch.uint8))
        torch.jit.save(module, str(folder / "model.pt"))
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    steps = [{"op": "resize", "method": "squish", "height": HEIGHT, "width": WIDTH, "resample": "bilinear",
              "pad_mode": "reflection"}]
    manifest = Manifest.create(folder, name="toy-cars.v1", model_file="model.pt", labels_file="labels.txt",
                               num_classes=len(LABELS), steps=steps)
    manifest.write(folder)
    return folder, manifest


def test_repository_matches_the_manifest_and_the_module(artifact):
    folder, manifest = artifact
    model_dir = triton.write_model_repository(folder, manifest, max_batch_size=8)
    assert model_dir == folder / "triton" / "toy-cars.v1"
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())

    assert config["name"] == "toy-cars.v1" and config["platform"] == "pytorch_libtorch"
    assert config["max_batch_size"] == 8
    (given,) = [config["input"]] if isinstance(config["input"], dict) else config["input"]
    (answer,) = [config["output"]] if isinstance(config["output"], dict) else config["output"]
    assert given == {"name": "images__0", "data_type": "TYPE_UINT8", "dims": [3, HEIGHT, WIDTH]}
    assert answer["name"] == "probabilities__0" and answer["data_type"] == "TYPE_FP32"
    assert answer["dims"] == [manifest.num_classes]
    assert (model_dir / answer["label_filename"]).read_text().splitlines() == LABELS
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and "dynamic_batching" in config

    # Triton keeps a version folder per model and loads model.pt from it.
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    copied = model_dir / "1" / "model.pt"
    assert sha(copied) == manifest.model_sha256 == sha(folder / "model.pt")

    # What Triton would send: a full batch of the declared dtype and dims.
    module = torch.jit.load(str(copied))
    batch = torch.randint(0, 256, (config["max_batch_size"], *given["dims"]), dtype=torch.uint8)
    out = module(batch)
    assert out.dtype == torch.float32 and list(out.shape) == [config["max_batch_size"], *answer["dims"]]


def test_a_changed_model_is_refused_and_the_old_repository_stays(artifact):
    folder, manifest = artifact
    model_dir = triton.write_model_repository(folder, manifest)
    before = (model_dir / "config.pbtxt").read_text()
    (folder / "model.pt").write_bytes(b"not the exported model")
    with pytest.raises(ArtifactError, match="sha256"):
        triton.write_model_repository(folder, manifest, max_batch_size=4)
    assert (model_dir / "config.pbtxt").read_text() == before
    assert sorted(p.name for p in folder.iterdir()) == ["labels.txt", "manifest.json", "model.pt", "triton"]


def test_rewriting_replaces_the_whole_repository(artifact):
    folder, manifest = artifact
    triton.write_model_repository(folder, manifest)
    (folder / "triton" / "stale").mkdir()
    triton.write_model_repository(folder, renamed(manifest, name="toy2"), max_batch_size=2, instances=3)
    assert [p.name for p in (folder / "triton").iterdir()] == ["toy2"]
    config = parse_pbtxt((folder / "triton" / "toy2" / "config.pbtxt").read_text())
    assert config["max_batch_size"] == 2 and config["instance_group"][0]["count"] == 3


@pytest.mark.parametrize("name", ["with space", "../escape", "", None])
def test_names_triton_cannot_use_are_refused(artifact, name):
    folder, manifest = artifact
    with pytest.raises(triton.TritonError, match="name"):
        triton.write_model_repository(folder, renamed(manifest, name=name))
    assert not (folder / "triton").exists()


def test_inputs_this_writer_does_not_know_are_refused(artifact):
    folder, manifest = artifact
    with pytest.raises(triton.TritonError, match="float32"):
        triton.render_config(renamed(manifest, input={**manifest.data["input"], "dtype": "float32"}))


def test_standalone_command(artifact):
    folder, manifest = artifact
    run = subprocess.run([sys.executable, "-m", "export.triton", str(folder), "--max-batch-size", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    config = parse_pbtxt((folder / "triton" / manifest.name / "config.pbtxt").read_text())
    assert config["max_batch_size"] == 16


def test_standalone_command_names_a_missing_artifact(tmp_path, capsys):
    assert triton.main([str(tmp_path / "nowhere")]) == 1
    assert "nowhere has no current version" in capsys.readouterr().err


def test_standalone_command_uses_the_current_version_of_a_model_folder(artifact, tmp_path):
    folder, manifest = artifact
    models = tmp_path / "models"
    models.mkdir()
    os.rename(folder, models / "3")
    os.symlink("3", models / "current")
    assert triton.main([str(models)]) == 0
    assert (models / "3" / "triton" / manifest.name / "config.pbtxt").is_file()


def test_parser_reads_repeated_fields_and_comments():
    parsed = parse_pbtxt('# c\nname: "a:b" # trailing\nx [ { k: 1 }, { k: 2 } ]\ny { z: [ 1, 2 ] }\ny { z: [] }\n')
    assert parsed == {"name": "a:b", "x": [{"k": 1}, {"k": 2}], "y": [{"z": [1, 2]}, {"z": []}]}
