"""An artifact that answers for several learners at once (`python -m export --also`)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from export import cli
from export import compiled as compiled_mod
from learners.learner import load, write_sidecar
from serve.model.artifact import load_artifact
from serve.model.manifest import Manifest, sha256_file
from serve.model.preprocess import Preprocessor
from tests.support.paths import CARS, car_photos
from tests.support.training import train_tiny


@pytest.fixture(scope="module")
def learners(tmp_path_factory) -> tuple[Path, Path]:
    """Two learners of the same classes and split that learnt differently."""
    return (train_tiny(tmp_path_factory.mktemp("first")),
            train_tiny(tmp_path_factory.mktemp("second"), "--lr", "2e-2", "--make-loss", "1"))


def test_an_ensemble_answers_the_geometric_mean_of_its_learners(learners, tmp_path, monkeypatch):
    first, second = learners
    # One compiled shape is enough to see the compiled packages pass their check as the ensemble.
    monkeypatch.setattr(compiled_mod, "SHAPES", (compiled_mod.Shape(None, None),))
    out = tmp_path / "ensemble"
    assert cli.main([str(first), "--also", str(second), "--out", str(out), "--images", str(CARS)]) == 0
    manifest = Manifest.read(out / "1")
    source = manifest.data["source"]
    assert source["learner_sha256"] == sha256_file(first)
    assert [m["learner_sha256"] for m in source["ensemble"]] == [sha256_file(second)]
    assert manifest.data["architecture"].startswith("ensemble of 2")
    assert manifest.data["parity"]["passed"] and len(manifest.compiled) == 1

    # The answer, worked out from the two models directly.
    served = load_artifact(out / "1", runtime="torchscript")
    preprocessor = Preprocessor(served.steps, 10**8)
    pixels = torch.stack([preprocessor(p.read_bytes()) for p in car_photos()[:6]])
    prepro = manifest.data["preprocessing"]["in_model"]
    x = (pixels.float() / prepro["divide_by"] - torch.tensor(prepro["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(prepro["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        scores = [torch.log_softmax(load(path).model.eval().float()(x), dim=-1) for path in (first, second)]
        got = served.runner(pixels)[:, :manifest.num_classes]
    served.close()
    # Compared as scores (log-probabilities times the temperature, less each row's mean), which
    # a large temperature does not squash together.
    temperature = manifest.data["output"]["temperature"]
    got = centred(got.log() * temperature)
    assert torch.allclose(got, centred(torch.stack(scores).mean(dim=0)), atol=1e-3)
    # Both models count: the ensemble is neither one alone.
    for alone in scores:
        assert not torch.allclose(got, centred(alone), atol=1e-2)


def centred(scores: torch.Tensor) -> torch.Tensor:
    return scores - scores.mean(dim=-1, keepdim=True)


@pytest.mark.parametrize("change, says", [
    ("split", "not trained on the same split"),
    ("classes", "knows other classes"),
    ("int8", "--quantize int8 has not been measured on an ensemble"),
])
def test_an_ensemble_of_learners_that_do_not_fit_together_is_refused(learners, tmp_path, change, says, capsys,
                                                                     monkeypatch):
    first, second = learners
    other = tmp_path / "other.pkl"
    shutil.copy(second, other)
    info = json.loads(second.with_name("export.pkl.json").read_text())
    argv = [str(first), "--also", str(other), "--out", str(tmp_path / "out"), "--images", str(CARS),
            "--no-compiled"]
    if change == "split":
        info["valid_files"] = info["valid_files"][1:]
    elif change == "classes":
        def reordered(path):
            learn = load(path)
            if path == other:
                learn.dls.vocab = list(reversed(learn.dls.vocab))
            return learn
        monkeypatch.setattr(cli.learner_io, "load", reordered)
    else:
        argv += ["--quantize", "int8"]
    write_sidecar(other, info)
    assert cli.main(argv) == 1
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
