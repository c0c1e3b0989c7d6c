"""What the inference core needs to know, and nothing more: where the model folder is, which
runtime may serve, how the inference threads are laid out, and how large an image may be decoded.

The server's Config builds one (Config.inference); the batch command and the benchmarks build
their own. The core never sees host, port or the admin token, so that loading a model never
needs a server's configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# --runtime: auto takes the compiled package when it can serve here, TorchScript otherwise.
RUNTIMES = ("auto", "compiled", "torchscript")
# The largest width*height decoded (--max-image-pixels); a decompression bomb is refused above it.
MAX_IMAGE_PIXELS = 50_000_000


@dataclass(frozen=True)
class InferenceSettings:
    model_dir: Path = Path("artifacts")
    runtime: str = "auto"
    torch_threads: int = 1
    inference_workers: int = 1
    micro_batch: int = 1
    solo_threads: int = 1
    batch_wait_ms: float = 0.0
    max_image_pixels: int = MAX_IMAGE_PIXELS
