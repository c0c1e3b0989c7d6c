"""What JPEG draft decoding costs in accuracy and saves in time, on real photos at phone size.

Each test photo is stretched to 12 megapixels (4000x3000, quality 90), then scored twice with
the served model: decoded in full, and decoded by Pillow's draft mode (the JPEG decoder scales
by 1/2, 1/4 or 1/8 in the DCT while staying at least `margin` times the model's input). Prints
top-1 agreement, the largest probability difference and the decode+resize times:

    python -m bench.draft_check [--model-dir artifacts] [--margin 1 --margin 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402 - after the NumPy warning filter

from serve.artifact import load_artifact  # noqa: E402 - after the NumPy warning filter
from serve.preprocess import DRAFT_MARGIN, Preprocessor  # noqa: E402 - after the NumPy warning filter
from serve.versions import current_folder  # noqa: E402 - after the NumPy warning filter

from .inputs import car_photos, phone_jpeg  # noqa: E402 - after the NumPy warning filter

MAX_PIXELS = 200_000_000


def pixels(data: bytes, preprocess: Preprocessor) -> tuple[torch.Tensor, float, tuple]:
    t0 = time.perf_counter()
    tensor = preprocess(data)
    elapsed = (time.perf_counter() - t0) * 1000
    return tensor, elapsed, preprocess.decode(data).size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.draft_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--margin", type=int, action="append", help="draft margins to try (default: the server's)")
    p.add_argument("--photos", type=int, default=0, help="use only the first N photos (default: all)")
    args = p.parse_args(argv)
    artifact = load_artifact(current_folder(args.model_dir))
    steps = artifact.steps
    margins = args.margin or [None]
    photos = car_photos()[: args.photos or None]
    rows, summary = [], {}
    torch.set_num_threads(1)
    for photo in photos:
        data = phone_jpeg(photo)
        full, full_ms, _ = pixels(data, Preprocessor(steps, MAX_PIXELS, draft_margin=None))
        with torch.inference_mode():
            p_full = artifact.runner(full.unsqueeze(0))[0]
        row = {"photo": f"{photo.parent.name}/{photo.name}", "full_ms": full_ms,
               "full_top1": artifact.labels[int(p_full.argmax())], "true": photo.parent.name}
        for margin in margins:
            drafted, draft_ms, decoded = pixels(data, Preprocessor(steps, MAX_PIXELS, margin or DRAFT_MARGIN))
            with torch.inference_mode():
                p_draft = artifact.runner(drafted.unsqueeze(0))[0]
            key = f"margin{margin}" if margin is not None else "server"
            row[key] = {"decoded": decoded, "ms": draft_ms, "agree": int(p_draft.argmax()) == int(p_full.argmax()),
                        "max_abs_diff": float((p_draft - p_full).abs().max()),
                        "pixel_mean_abs_diff": float((drafted.float() - full.float()).abs().mean())}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    for key in [k for k in rows[0] if isinstance(rows[0][k], dict)]:
        summary[key] = {
            "decoded_size": rows[0][key]["decoded"],
            "top1_agree": sum(r[key]["agree"] for r in rows), "photos": len(rows),
            "max_abs_diff": max(r[key]["max_abs_diff"] for r in rows),
            "median_abs_diff": statistics.median(r[key]["max_abs_diff"] for r in rows),
            "pixel_mean_abs_diff": statistics.fmean(r[key]["pixel_mean_abs_diff"] for r in rows),
            "ms_median": statistics.median(r[key]["ms"] for r in rows),
        }
    summary["full"] = {"ms_median": statistics.median(r["full_ms"] for r in rows),
                       "top1_correct": sum(r["full_top1"] == r["true"] for r in rows)}
    print(json.dumps({"model": artifact.name, "summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
