"""An artifact exported under the train side's torch, scored under the serve side's torch."""

import json

import torch

from serve.model.artifact import load_artifact
from serve.model.preprocess import Preprocessor
from tests.support.paths import CARS


def test_exported_under_another_torch(cross_dir):
    expected = json.loads((cross_dir / "expected.json").read_text())
    manifest = json.loads((cross_dir / "artifact" / "manifest.json").read_text())
    assert manifest["versions"]["torch"] == expected["torch"]
    assert expected["torch"].split("+")[0] != torch.__version__.split("+")[0], \
        "export and serve ran the same torch; the cross-version check would prove nothing"


def test_probabilities_match_what_the_exporter_saw(cross_dir):
    expected = json.loads((cross_dir / "expected.json").read_text())["probabilities"]
    artifact = load_artifact(cross_dir / "artifact", runtime="torchscript")  # optimised, as the server runs it
    # The server's own preprocessing, JPEG draft decoding included (the export side used it too).
    preprocessor = Preprocessor(artifact.steps, 10**8)
    assert len(expected) == 24
    worst = 0.0
    for name, row in expected.items():
        pixels = preprocessor((CARS / name).read_bytes())
        with torch.inference_mode():
            got = artifact.runner(pixels.unsqueeze(0))[0]  # probabilities and familiarity
        want = torch.tensor(row)
        assert int(got.argmax()) == int(want.argmax()), name
        worst = max(worst, float((got - want).abs().max()))
    assert worst < 1e-4, f"max probability difference {worst}"
