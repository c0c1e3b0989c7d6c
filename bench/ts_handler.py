"""TorchServe handler for the benchmark's peer server: the same TorchScript file, and the same
decode and resize as whatcar (Pillow, EXIF orientation, RGB, the manifest's squish resize).

Packaged with model.pt, manifest.json and labels.txt by `python -m bench`. Torch threads per
worker come from WHATCAR_TS_TORCH_THREADS (default 1): one worker per core, each on one
thread, is the layout TorchServe's own CPU guidance leads to.
"""

import io
import json
import os
import warnings

import torch
from PIL import Image, ImageOps

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


class WhatcarHandler:
    def __init__(self):
        self.module = None

    def initialize(self, context):
        torch.set_num_threads(int(os.environ.get("WHATCAR_TS_TORCH_THREADS", "1")))
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "manifest.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
        with open(os.path.join(model_dir, "labels.txt"), encoding="utf-8") as fh:
            self.labels = fh.read().splitlines()
        steps = manifest["preprocessing"]["steps"]
        if len(steps) != 1 or steps[0]["op"] != "resize" or steps[0]["method"] != "squish":
            raise ValueError("this handler replays a single squish resize only")
        self.size = (steps[0]["width"], steps[0]["height"])
        self.resample = RESAMPLE[steps[0]["resample"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(os.path.join(model_dir, "model.pt"), map_location="cpu").eval()
            # The optimisation whatcar applies after loading, so the peer runs the same graph.
            self.module = torch.jit.optimize_for_inference(module)
        probe = torch.zeros((1, 3, self.size[1], self.size[0]), dtype=torch.uint8)
        with torch.inference_mode():
            for _ in range(3):
                self.module(probe)

    def pixels(self, data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image) or image
        image = image.convert("RGB").resize(self.size, self.resample)
        buffer = bytearray(image.tobytes())
        return torch.frombuffer(buffer, dtype=torch.uint8).view(self.size[1], self.size[0], 3).permute(2, 0, 1)

    def handle(self, data, context):
        batch = torch.stack([self.pixels(row.get("data") or row.get("body")) for row in data])
        with torch.inference_mode():
            outputs = self.module(batch)
        # A model with acceptance thresholds also returns each photo's familiarity; ranking needs
        # only the probabilities (the comparison still pays for computing both, as whatcar does).
        probabilities = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        out = []
        for row in probabilities:
            values, indices = row.topk(min(5, len(self.labels)))
            out.append({"predictions": [{"label": self.labels[i], "probability": round(float(v), 6)}
                                        for v, i in zip(values.tolist(), indices.tolist())]})
        return out
