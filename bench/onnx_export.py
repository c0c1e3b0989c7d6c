"""The served module as ONNX, for the benchmark's OpenVINO reference (training virtualenv: it
needs the onnx package, which the server never has).

    python -m bench.onnx_export MODEL_FOLDER OUT.onnx

Exported from the artifact's own model.pt, the traced and frozen TorchScript module, so the
reference runs exactly the served graph: uint8 [N, 3, H, W] in, the module's outputs out, N free.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

from serve.model.manifest import Manifest
from serve.model.versions import current_folder


def export_onnx(folder: Path, out: Path) -> float:
    """Write `out` from the artifact in `folder`; returns the seconds it took."""
    manifest = Manifest.read(folder)
    model = manifest.verified_file(folder, "model")
    height, width = manifest.input_size
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(model), map_location="cpu").eval()
        example = torch.zeros((2, 3, height, width), dtype=torch.uint8)
        outputs = module(example)
        count = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
        names = [f"output{i}" for i in range(count)]
        # The TorchScript-based exporter: it takes a frozen ScriptModule as it is.
        torch.onnx.export(module, (example,), str(out), dynamo=False, opset_version=17, input_names=["images"],
                          output_names=names, dynamic_axes={"images": {0: "N"}, **{n: {0: "N"} for n in names}})
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bench.onnx_export MODEL_FOLDER OUT.onnx", file=sys.stderr)
        return 2
    seconds = export_onnx(current_folder(Path(argv[0])), Path(argv[1]))
    print(f"wrote {argv[1]} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
