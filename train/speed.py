"""How much faster `make train` trains in the layout and precision it chooses for this CPU than
in fp32 with contiguous batches, how it trained before.

    python -m train.speed DATA [--batches 30] [--rounds 2]

The recipe's own learner on DATA (unfrozen as in the long phase, 224 px, batch 32) trains BATCHES
batches in each way, alternated ROUNDS times on one process, so that other load on the host falls
on both alike; each time runs from the first batch drawn to the last optimiser step, loading
included. The ratio of the medians is the speed-up of an epoch's training part.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelFitException

from . import cli, precision


class TimeBatches(Callback):
    """Times `batches` training batches, loading included, after a first one that pays for the
    warm-up (allocations, oneDNN's primitives for the layout), then stops the fit."""

    order = 100

    def __init__(self, batches: int):
        self.batches, self.seconds, self._started, self._done = batches, None, None, 0

    def after_batch(self):
        if self._started is None:
            self._started = time.perf_counter()
            return
        self._done += 1
        if self._done == self.batches:
            self.seconds = time.perf_counter() - self._started
            raise CancelFitException()


def ways(choice: precision.Choice) -> dict[str, tuple[torch.memory_format, list]]:
    """Each way to train: the model's memory layout and the callbacks of each batch."""
    return {
        "fp32, contiguous (before)": (torch.contiguous_format, []),
        f"{choice.precision}, channels-last (chosen)": (torch.channels_last,
                                                        [precision.ChannelsLastAutocast(choice.precision)]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    opts = p.parse_args(argv)
    args = cli.parse_args([str(opts.data), "--quiet"])
    dls = cli.build_dataloaders(args)
    learn = cli.build_learner(dls, args)
    from fastai.callback.progress import ProgressCallback
    from fastcore.basics import noop

    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    learn.freeze_to(1)  # as in the unfrozen epochs: the stem and the first blocks stay frozen
    choice = precision.choose_precision(precision.read_cpu_flags(), precision.AUTO)
    print(f"{len(dls.train_ds)} training photos, batch {args.batch_size}, {args.size} px, "
          f"torch threads {torch.get_num_threads()}; {choice.describe()}", file=sys.stderr)
    seconds: dict[str, list[float]] = {name: [] for name in ways(choice)}
    for _ in range(opts.rounds):
        for name, (layout, callbacks) in ways(choice).items():
            learn.model.to(memory_format=layout)
            timer = TimeBatches(opts.batches)
            learn.fit(1, 1e-5, cbs=[*callbacks, timer])  # a tiny rate: the weights barely move between ways
            seconds[name].append(timer.seconds)
    per_epoch = len(dls.train)
    medians = {}
    for name, runs in seconds.items():
        medians[name] = statistics.median(runs)
        rate = opts.batches * args.batch_size / medians[name]
        print(f"{name}: {rate:.1f} images/s (median of {len(runs)}; "
              f"{min(runs):.1f}-{max(runs):.1f} s for {opts.batches} batches), "
              f"{medians[name] / opts.batches * per_epoch / 60:.1f} min for an epoch's {per_epoch} batches")
    before, chosen = medians.values()
    print(f"speed-up of an epoch's training: {before / chosen:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
