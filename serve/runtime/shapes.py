"""Which compiled shape runs a pass: one package per (batch, threads) the server runs, and the
fallbacks for every other pass.

A static package, compiled for one batch size and one intra-op thread count, carries its
convolution weights packed for oneDNN at compile time. A dynamic-batch package cannot: Inductor
packs weights only for static shapes (pytorch#121400), so oneDNN reorders every weight on
every pass. And the generated kernels take their thread count when compiled. Measured on a
2-core AMD EPYC (Zen 4), the 352 px default model, torch 2.13.0, against OpenVINO fp32 in the
same run (docs/benchmark.md): batch 1 took 1.15x OpenVINO's time on 1 thread and 1.12x on 2
with the static package of that thread count, against 1.23x and 1.43x for the dynamic package,
while a static package run on the other thread count took 2.1-2.3x.

`choose_shape` is the pure rule; `ShapedRunner` is what the inference threads call. It picks
per pass from the batch and the calling thread's intra-op thread count, so the solo thread
(all cores) and the shared workers (one thread each) each get the package built for them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

log = logging.getLogger("whatcar")

TORCHSCRIPT = "torchscript"


class Shape(Protocol):
    min_batch: int
    max_batch: int
    threads: int | None


def choose_shape(batch: int, threads: int, packages: Sequence[Shape]):
    """The package that runs a pass of `batch` images on `threads` intra-op threads, or None for
    TorchScript.

    First a static package of exactly that batch and thread count; then one that takes any
    thread count and covers the batch (the dynamic package), the narrowest first. A package
    built for another thread count is never used: its kernels would start their own count of
    threads, and its packed weights were laid out for that count.
    """
    exact = [p for p in packages if p.min_batch == p.max_batch == batch and p.threads == threads]
    if exact:
        return exact[0]
    covering = [p for p in packages if p.threads is None and p.min_batch <= batch <= p.max_batch]
    return min(covering, key=lambda p: p.max_batch - p.min_batch) if covering else None


def shape_name(package) -> str:
    return TORCHSCRIPT if package is None else package.shape


def describe_passes(passes: Sequence[tuple[int, int]], packages: Sequence[Shape]) -> str:
    """`b1t1 -> b1t1, b2t1 -> b1-64, ...`: what runs each pass the server plans."""
    return ", ".join(f"b{batch}t{threads} on {shape_name(choose_shape(batch, threads, packages))}"
                     for batch, threads in passes)


class ShapedRunner:
    """The compiled packages of one model, by shape, and TorchScript for any other pass.

    `runners` maps each loaded package to its CompiledRunner. `later` maps the packages no
    planned pass uses (with the defaults, the dynamic one) to a function that loads them: each
    loads the first time a pass needs it, which saved a cold start about 0.1 s and a process
    about 25 MB of resident weights. `torchscript` loads the TorchScript runner the first time a
    pass has no package. A package that fails to load later leaves its passes to the next
    choice, with one WARNING line.
    """

    def __init__(self, runners: dict, torchscript: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
                 later: dict | None = None):
        self.runners = dict(runners)
        self._later = dict(later or {})
        self._load_torchscript = torchscript
        self._torchscript = None
        self._lock = threading.Lock()

    @property
    def packages(self) -> list:
        """Every package that may run a pass: loaded, or to be loaded when first needed."""
        return list(self.runners) + list(self._later)

    def choose(self, batch: int, threads: int | None = None):
        return choose_shape(batch, torch.get_num_threads() if threads is None else threads, self.packages)

    def ran(self, batch: int) -> str:
        """The name of what runs a pass of `batch` images on the calling thread."""
        return shape_name(self.choose(batch))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        while True:
            package = self.choose(images.shape[0])
            if package is None:
                return self.torchscript()(images)
            runner = self.runner_for(package)
            if runner is not None:
                return runner(images)

    def runner_for(self, package):
        """The package's runner, loaded now if it waited for a first pass; None if it fails to
        load (it is then dropped, with a WARNING line) or was dropped before."""
        if package in self.runners:
            return self.runners[package]
        with self._lock:
            if package in self.runners:
                return self.runners[package]
            load = self._later.pop(package, None)
            if load is None:
                return None
            try:
                self.runners[package] = load()
            except Exception as exc:  # noqa: BLE001 - any failure leaves the pass to the next choice
                log.warning("compiled %s not used, its passes go to the next runtime: it failed to load: %s",
                            package.shape, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                return None
            return self.runners[package]

    def torchscript(self):
        with self._lock:
            if self._torchscript is None:
                self._torchscript = self._load_torchscript()
            return self._torchscript

    def drop(self, package) -> None:
        """Stop using one package (it failed its check); its passes go to the next choice."""
        self._later.pop(package, None)
        runner = self.runners.pop(package, None)
        if runner is not None:
            runner.close()

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
        self._later.clear()
