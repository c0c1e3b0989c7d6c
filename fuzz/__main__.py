"""Coverage-guided fuzzing of decode + preprocess with atheris (libFuzzer):

    python -m fuzz CORPUS_DIR [libFuzzer flags, e.g. -max_total_time=60 -artifact_prefix=crashes/]

The corpus folder is seeded with small images of every accepted format. A crash (any exception
other than ImageRejected, or a failed check) stops the run and leaves the input as a crash-* file;
add it to tests/serve/test_fuzz_decode.py as a regression case.
"""

import sys
import warnings
from pathlib import Path

import atheris
import torch  # noqa: F401 - loaded before instrumenting: only Pillow and whatcar's code are measured

warnings.filterwarnings("ignore")  # Pillow's warnings about damaged files are expected here

with atheris.instrument_imports():
    from PIL import Image

    Image.init()  # import every format plugin now, so that their Python code is instrumented too
    from fuzz.target import check, seed_inputs
    from serve import decode, preprocess  # noqa: F401 - imported inside the block only to instrument them


def one_input(data: bytes) -> None:
    # The last byte picks the preprocessing, so the fuzzer can steer towards each method.
    if data:
        check(data[:-1], steps_choice=data[-1])


def main() -> None:
    corpus = next((Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if corpus is not None:
        corpus.mkdir(parents=True, exist_ok=True)
        for name, data in seed_inputs().items():
            seed = corpus / f"seed-{name}"
            if not seed.exists():
                seed.write_bytes(data + b"\x00")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


main()
