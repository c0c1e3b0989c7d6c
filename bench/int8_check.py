"""Could int8 pay on this CPU? A quick answer before anyone builds a quantised export.

    python -m bench.int8_check [--size 288] [--threads 1] [--seconds 3]

Builds a network with EfficientNet-Lite0's layer shapes (stem, the seven stages of inverted
residual blocks with their 3x3 and 5x5 depthwise convolutions, the 1x1 head) and random
weights, then times one image through it as the server would run it (traced, frozen, optimised
for inference) and as fbgemm int8 after post-training static quantisation. Speed is the only
question here: it says what the hardware could gain, not what a trained model keeps (see
docs/benchmark.md, "Quantisation").

int8 pays most where the CPU has VNNI (AVX-512 VNNI or AVX-VNNI), which multiplies and adds
four int8 pairs per lane in one instruction; on AVX2 alone fbgemm widens to int16 first.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")

# EfficientNet-Lite0: (expansion, kernel, stride, output channels, repeats) per stage.
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
EXTENSIONS = {"avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16"}


def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=True)]
    if act:
        layers.append(nn.ReLU())  # Lite0 has ReLU6; plain ReLU is what eager int8 fuses, at the same cost
    return nn.Sequential(*layers)


def lite0_shaped() -> nn.Sequential:
    layers, cin = [conv(3, 32, 3, 2)], 32
    for expansion, kernel, stride, cout, repeats in STAGES:
        for i in range(repeats):
            mid = cin * expansion
            if expansion != 1:
                layers.append(conv(cin, mid, 1))
            layers.append(conv(mid, mid, kernel, stride if i == 0 else 1, groups=mid))
            layers.append(conv(mid, cout, 1, act=False))
            cin = cout
    layers.append(conv(cin, 1280, 1))
    return nn.Sequential(*layers).eval()


def quantised(model: nn.Sequential, size: int) -> nn.Module:
    from torch.ao import quantization as tq

    wrapped = nn.Sequential(tq.QuantStub(), model, tq.DeQuantStub()).eval()
    for block in model:
        if len(block) == 2:
            tq.fuse_modules(block, [["0", "1"]], inplace=True)
    wrapped.qconfig = tq.get_default_qconfig("fbgemm")
    tq.prepare(wrapped, inplace=True)
    with torch.no_grad():
        for _ in range(4):
            wrapped(torch.randn(1, 3, size, size))
    return tq.convert(wrapped, inplace=True)


def median_ms(module, example: torch.Tensor, seconds: float) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(3):
            module(example)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 5:
            started = time.perf_counter()
            module(example)
            times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int8_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=288, help="input size in pixels (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per variant (default: %(default)s)")
    args = p.parse_args(argv)
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        print("this torch build has no fbgemm int8 engine")
        return 1
    torch.backends.quantized.engine = "fbgemm"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    example = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        served = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(lite0_shaped(), example)))
        int8 = torch.jit.freeze(torch.jit.trace(quantised(lite0_shaped(), args.size), example))
    fp32_ms = median_ms(served, example, args.seconds)
    int8_ms = median_ms(int8, example, args.seconds)
    found = sorted(cpu_flags() & EXTENSIONS)
    print(f"CPU int8/bf16 extensions: {', '.join(found) or 'none (AVX2 at most)'}")
    print(f"Lite0-shaped network, {args.size} px, {args.threads} thread(s), one image:")
    print(f"  float32, traced + frozen + optimize_for_inference: {fp32_ms:.1f} ms")
    print(f"  int8, fbgemm, static post-training:                {int8_ms:.1f} ms")
    print(f"  int8 speed-up: {fp32_ms / int8_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
