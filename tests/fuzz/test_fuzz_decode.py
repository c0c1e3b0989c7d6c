"""A short, seeded mutation fuzz of decode + preprocess, deterministic for `make test`.

`make fuzz` runs the coverage-guided version (atheris) for as long as asked; this one replays
the same property over a fixed sequence of mutated seed images, so any failure reproduces.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
from collections import Counter

import pytest
from PIL import Image

from fuzz.target import check, seed_inputs

ITERATIONS = 6000  # about 2 s
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


def mutate(data: bytes, other: bytes, rng: random.Random) -> bytes:
    """One to four of libFuzzer's usual moves, half of them aimed at the first 64 bytes (headers)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            out = bytearray(rng.randbytes(8))
        end = min(len(out), 64) if rng.random() < 0.5 else len(out)
        at = rng.randrange(end)
        move = rng.randrange(7)
        if move == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif move == 1:
            out[at] = rng.randrange(256)
        elif move == 2:
            del out[at:at + rng.randint(1, 64)]
        elif move == 3:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        elif move == 4:  # a size or offset field set to an edge value
            fmt = rng.choice(["<H", ">H", "<I", ">I"])
            value = rng.choice(INTERESTING) & (0xFFFF if fmt.endswith("H") else 0xFFFFFFFF)
            packed = struct.pack(fmt, value)
            out[at:at + len(packed)] = packed
        elif move == 5:
            out = out[:at]
        else:  # splice: this file's head on another file's tail
            out = out[:at] + other[rng.randrange(len(other)):]
    return bytes(out)


def test_seeds_are_all_scored():
    for name, data in seed_inputs().items():
        assert check(data) == "scored", name


def test_mutated_images_give_an_image_or_a_rejection():
    seeds = list(seed_inputs().values())
    rng = random.Random(1125)
    outcomes = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about damaged files; those are expected here
        for i in range(ITERATIONS):
            data = mutate(rng.choice(seeds), rng.choice(seeds), rng)
            try:
                outcomes[check(data, steps_choice=i)] += 1
            except Exception as exc:  # noqa: BLE001 - turned into a reproducible report
                pytest.fail(f"iteration {i}: {type(exc).__name__}: {exc}\ninput ({len(data)} bytes): {data[:200]!r}")
    # Both sides were reached, so the loop tested something.
    assert outcomes["scored"] > ITERATIONS // 10 and outcomes["rejected"] > ITERATIONS // 10, outcomes


def strip_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 200)).save(out, "PNG")
    return out.getvalue()


# Inputs that once broke the property; each must stay an image or a rejection.
REGRESSIONS = {
    # Within the pixel limit, but a "pad" resize would first build a 1,000,000-pixel-square canvas.
    "pad-strip": lambda: strip_png(1, 1_000_000),
    "pad-strip-wide": lambda: strip_png(1_000_000, 1),
    # A PNG cut inside its first chunk: once reported as a foreign file type.
    "png-header-cut": lambda: strip_png(40, 30)[:40],
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regressions(name):
    assert check(REGRESSIONS[name]()) in ("scored", "rejected")
