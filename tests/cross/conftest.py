import os
from pathlib import Path

import pytest

from serve.model.onednn import cap_isa

# Compiled packages run here as the server runs them: oneDNN capped at the ISA their weights are
# packed for (serve/model/onednn.py), set before any test runs a convolution.
cap_isa()


@pytest.fixture(scope="module")
def cross_dir() -> Path:
    # Set by `make test`, which runs tests/export first; running this alone is a mistake, not a skip.
    assert "WHATCAR_CROSS_DIR" in os.environ, "run through `make test` (needs the artifact tests/export writes)"
    folder = Path(os.environ["WHATCAR_CROSS_DIR"])
    assert (folder / "expected.json").is_file(), f"{folder} has no exported artifact; did tests/export run?"
    return folder
