"""Where a forward pass spends its time, layer kind by layer kind: the served compiled shapes
(oneDNN's own log of every primitive it runs, ONEDNN_VERBOSE=profile_exec) beside OpenVINO
fp32's per-layer performance counters on the same model (bench/openvino_profile.py).

    python -m bench.profile [--model-dir artifacts] [--threads 1] [--runs 5]

Each compiled shape runs in a child process of its own, because oneDNN reads its settings once
(the child gets the server's ONEDNN_MAX_CPU_ISA and malloc settings, serve/onednn.py and
serve/malloc.py). The pass is timed
without the log first, then logged: "outside oneDNN" is the wall time no primitive accounts
for (Inductor's own kernels: the uint8 -> float preamble, activations, pooling, softmax).
docs/benchmark.md has a run of it and what it showed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# OpenVINO's counters name a convolution without its kernel size, so the stem's 3x3 and the 1x1
# convolutions share a row.
DENSE = "dense convolutions (the 3x3 stem, 1x1)"
ORDER = (DENSE, "depthwise convolutions", "other convolutions", "fully connected", "weight reorders",
         "other reorders", "pooling", "elementwise", "other")


def kind_of_primitive(fields: list[str]) -> str:
    """The layer kind of one `onednn_verbose,v1,primitive,exec,...` line."""
    primitive, shape = fields[5], fields[-2]
    if primitive == "convolution":
        if shape.startswith("g"):
            return "depthwise convolutions"
        if "ic3oc" in shape or "kh1" in shape and "kw1" in shape:
            return DENSE
        return "other convolutions"
    if primitive in ("inner_product", "matmul"):
        return "fully connected"
    if primitive == "reorder":
        # Weights are blocked by output channel, a format tag that starts with a capital A
        # (Acdb32a); activations are not (acdb, aBcd8b).
        destination = next((part for part in fields[8].split() if part.startswith("dst:")), "")
        return "weight reorders" if destination.rsplit("blocked:", 1)[-1][:1] == "A" else "other reorders"
    if primitive == "pooling":
        return "pooling"
    if primitive in ("eltwise", "binary"):
        return "elementwise"
    return "other"


def summarise_onednn(lines: list[str]) -> dict[str, dict]:
    """{kind: {"ms": total, "count": n, "impl": {implementation: n}}} over one pass's log lines."""
    kinds: dict[str, dict] = {}
    for line in lines:
        if not line.startswith("onednn_verbose,v1,primitive,exec,"):
            continue
        fields = line.strip().split(",")
        kind = kinds.setdefault(kind_of_primitive(fields), {"ms": 0.0, "count": 0, "impl": collections.Counter()})
        kind["ms"] += float(fields[-1])
        kind["count"] += 1
        kind["impl"][fields[6]] += 1
    return kinds


CHILD = """
import json, sys, time, statistics, torch
sys.path.insert(0, {root!r})
from serve.malloc import keep_freed_memory
from serve.runtime.compiled import CompiledModel
keep_freed_memory()  # as the server does
torch.set_num_threads({threads})
model = CompiledModel({path!r})
images = torch.randint(0, 256, ({batch}, 3, {height}, {width}), dtype=torch.uint8)
with torch.inference_mode():
    for _ in range({passes}):
        model(images)
    wall = []
    for _ in range({runs}):
        t0 = time.perf_counter(); model(images); wall.append((time.perf_counter() - t0) * 1000)
print("@@wall " + json.dumps(wall), flush=True)
"""
LOGGED_PASSES = 4  # oneDNN logs every pass; the last one is the warm one kept


def profile_package(path: Path, batch: int, threads: int, height: int, width: int, runs: int) -> dict:
    """The median wall time of `runs` unlogged passes, and the layer kinds of one logged pass."""
    def child(passes: int, runs: int, verbose: str) -> list[str]:
        code = CHILD.format(root=str(ROOT), threads=threads, path=str(path), batch=batch, height=height,
                            width=width, passes=passes, runs=runs)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "ONEDNN_VERBOSE": verbose})
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
        return done.stdout.splitlines()

    timed = child(3, runs, "0")
    wall = json.loads(next(line for line in timed if line.startswith("@@wall "))[7:])
    logged = [line for line in child(LOGGED_PASSES, 0, "profile_exec")
              if line.startswith("onednn_verbose,v1,primitive,exec,")]
    per_pass = len(logged) // LOGGED_PASSES
    return {"wall_ms": statistics.median(wall), "kinds": summarise_onednn(logged[-per_pass:])}


def profile_openvino(folder: Path, threads: int, runs: int, scratch: Path) -> dict | str:
    python = ROOT / ".venv" / "openvino" / "bin" / "python"
    train = ROOT / ".venv" / "train" / "bin" / "python"
    if not python.is_file() or not train.is_file():
        return "no OpenVINO or training virtualenv (make openvino-env train-env)"
    onnx = scratch / "model.onnx"
    subprocess.run([str(train), "-m", "bench.onnx_export", str(folder), str(onnx)], cwd=ROOT, check=True,
                   capture_output=True)
    done = subprocess.run([str(python), "-m", "bench.openvino_profile", str(onnx), str(threads), str(runs)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(compiled: dict[str, dict], openvino: dict | str) -> list[str]:
    names = list(compiled)
    head = "| layer kind | " + " | ".join(f"compiled {n} ms (primitives)" for n in names)
    head += " | OpenVINO fp32 ms (layers) |" if isinstance(openvino, dict) else " |"
    lines = [head, "|---|" + "---:|" * (len(names) + isinstance(openvino, dict))]
    for kind in ORDER:
        cells = []
        for name in names:
            k = compiled[name]["kinds"].get(kind)
            cells.append(f"{k['ms']:.1f} ({k['count']})" if k else "-")
        if isinstance(openvino, dict):
            k = openvino["kinds"].get(kind)
            cells.append(f"{k['ms']:.1f} ({k['count']})" if k else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    sums = [sum(k["ms"] for k in compiled[n]["kinds"].values()) for n in names]
    outside = [f"{compiled[n]['wall_ms'] - s:.1f}" for n, s in zip(names, sums)]
    lines.append("| outside oneDNN (wall - primitives) | " + " | ".join(outside)
                 + (" | - |" if isinstance(openvino, dict) else " |"))
    walls = [f"**{compiled[n]['wall_ms']:.1f}**" for n in names]
    lines.append("| one pass, wall (median, unlogged) | " + " | ".join(walls)
                 + (f" | **{openvino['wall_ms']:.1f}** |" if isinstance(openvino, dict) else " |"))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=20, help="timed passes before the logged one (default: %(default)s)")
    args = p.parse_args(argv)

    from serve.manifest import Manifest
    from serve.onednn import cap_isa, packed_isa
    from serve.versions import current_folder

    cap_isa(packed_for=packed_isa(args.model_dir))  # the children inherit it, as the server's oneDNN has it
    folder = current_folder(args.model_dir)
    manifest = Manifest.read(folder)
    height, width = manifest.input_size
    compiled = {}
    for package in manifest.compiled:
        if package.threads not in (None, args.threads) or package.min_batch != 1:
            continue
        compiled[package.shape] = profile_package(folder / package.file, 1, args.threads, height, width, args.runs)
        print(f"profiled {package.shape}: {compiled[package.shape]['wall_ms']:.1f} ms a pass", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="whatcar-profile-") as scratch:
        openvino = profile_openvino(folder, args.threads, args.runs, Path(scratch))
    print(f"{manifest.name}, batch 1, {args.threads} thread(s), "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}, {time.strftime('%Y-%m-%d')}")
    if isinstance(openvino, str):
        print(f"OpenVINO skipped: {openvino}")
    print("\n".join(table(compiled, openvino)))
    for name, result in compiled.items():
        impls = collections.Counter()
        for kind in result["kinds"].values():
            impls.update(kind["impl"])
        print(f"{name} oneDNN implementations: " + ", ".join(f"{k} x{v}" for k, v in impls.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
