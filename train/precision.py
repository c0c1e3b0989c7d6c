"""The numeric precision and memory layout training runs in, chosen from the CPU's flags.

Measured on an AMD EPYC with AVX512_BF16, one EfficientNet-Lite0 train step (batch 32, 224 px,
2 threads): fp32 with contiguous inputs 12.4 images/s, bf16 autocast 21.6, fp32 channels-last
21.8, both 23.1. Channels-last gains everywhere, so it is always used. bf16 only pays where the
CPU computes it natively (AVX512_BF16 or AMX); elsewhere PyTorch emulates it in fp32 and a step
gets slower, so such CPUs train in fp32.

The weights and the optimiser stay fp32 either way: autocast only runs the matrix products and
convolutions of the forward pass in bf16, so the exported learner and the served model are fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.callback.core import Callback

FP32, BF16, AUTO = "fp32", "bf16", "auto"
REQUESTS = (AUTO, FP32, BF16)
# Either flag means the CPU has bf16 dot-product instructions (Intel Cooper Lake / Sapphire Rapids
# on, AMD Zen 4 on); oneDNN picks its bf16 kernels from them.
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
CHANNELS_LAST = "channels-last"


@dataclass(frozen=True)
class Choice:
    precision: str  # FP32 or BF16
    memory_format: str
    reason: str

    def describe(self) -> str:
        name = "bf16 autocast (fp32 weights)" if self.precision == BF16 else "fp32"
        return f"precision: {name}, {self.memory_format} inputs and weights; {self.reason}"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags in the text of /proc/cpuinfo (the first `flags` line: every core of one
    machine lists the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        return cpu_flags(path.read_text())
    except OSError:
        return set()  # not Linux, or no /proc: fp32, which is right on any CPU


def choose_precision(flags: set[str], requested: str, continuing: str | None = None) -> Choice:
    """The precision to train in, for a CPU with `flags`, asked for as `requested` (AUTO, FP32 or
    BF16). `continuing` is the precision of the checkpoint the run goes on from, if any: AUTO keeps
    it, so that a run resumed on another host ends with the weights the same recipe would give."""
    if requested not in REQUESTS:
        raise ValueError(f"precision must be one of {', '.join(REQUESTS)}, not {requested!r}")
    native = sorted(flags & set(NATIVE_BF16))
    if requested == AUTO and continuing in (FP32, BF16):
        precision, why = continuing, f"auto keeps the {continuing} of the checkpoint this run goes on from"
        if continuing == BF16 and not native:
            why += "; this CPU has no native bf16 (no avx512_bf16 or amx_bf16), so it will be slow"
    elif requested == AUTO:
        precision = BF16 if native else FP32
        why = (f"auto: the CPU computes bf16 natively ({', '.join(native)})" if native
               else "auto: the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), where bf16 would be "
                    "emulated and slower than fp32")
    elif requested == BF16 and not native:
        precision = BF16
        why = ("forced by --precision bf16, but the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag): "
               "it is emulated and will be slow, likely slower than fp32")
    else:
        precision, why = requested, f"forced by --precision {requested}"
    return Choice(precision, CHANNELS_LAST, why)


def autocast(precision: str):
    """The context the forward pass and the loss run in."""
    if precision == BF16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ChannelsLastAutocast(Callback):
    """Each batch's images in channels-last, and the forward pass and the loss under bf16
    autocast when `precision` is BF16; the backward pass and the optimiser step run outside it,
    on the fp32 weights.

    fastai's batches arrive contiguous (NCHW); a channels-last model given them converts each
    convolution's input on the fly, which cost as much as the layout saved.
    """

    order = 65  # after the callbacks that build the batch (MixUp/CutMix mix it in before_batch)

    def __init__(self, precision: str):
        self.precision = precision
        self._context = None

    def before_batch(self):
        self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last)
                              if isinstance(x, torch.Tensor) and x.ndim == 4 else x for x in self.xb)
        self._enter()

    def after_pred(self):
        # The loss is taken on fp32 logits: a bf16 softmax over 164 classes loses the small
        # probabilities label smoothing and distillation compare.
        if isinstance(self.pred, torch.Tensor) and self.pred.dtype == torch.bfloat16:
            self.learn.pred = self.pred.float()

    def after_loss(self):
        self._exit()

    def after_batch(self):
        self._exit()  # a batch cancelled before its loss still leaves the context

    def after_cancel_batch(self):
        self._exit()

    def after_fit(self):
        self._exit()

    def _enter(self):
        self._exit()
        if self.precision == BF16:
            self._context = autocast(BF16)
            self._context.__enter__()

    def _exit(self):
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)
