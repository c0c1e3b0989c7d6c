"""How long a training run will take: an estimate before the first epoch, and the time left after each.

The estimate times a few training steps on a synthetic batch at each input size and scales them
by the number of batches; once an epoch of a phase at a size has run, its measured time replaces
the estimate for that phase and size. Phases are kept apart because a head-only epoch costs
about 60 % of an unfrozen one (2.0 against 3.3-3.7 min at 224 px on 2 cores): counting them
together put 56 minutes left after the first unfrozen epoch of a run with 90 to go.
The weights, BatchNorm statistics, gradients and random generators are put back as they were, so
timing changes nothing about the run.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

# A validation batch is a forward pass only: about a third of a training step (forward + backward).
VALID_SHARE = 1 / 3


def step_seconds(model: torch.nn.Module, batch_size: int, size: int, repeats: int = 2, bf16: bool = False) -> float:
    """The fastest of `repeats` forward + backward passes at `size`, after one warm-up pass, with
    the forward pass under bf16 autocast when the run trains so (it takes about half the time)."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    x = torch.rand(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.random.fork_rng():
        model.train()
        for i in range(repeats + 1):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().logsumexp(dim=1).sum().backward()
            if i:
                best = min(best, time.perf_counter() - started)
            for p in model.parameters():
                p.grad = None
    model.load_state_dict(saved)
    model.train(was_training)
    return best


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


@dataclass
class Plan:
    """The epochs of a run in order, each as (phase, epoch within the phase, input size)."""

    epochs: list[tuple[str, int, int]]
    train_batches: int
    valid_batches: int
    estimate: dict[int, float] = field(default_factory=dict)  # seconds per epoch, by size
    measured: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # by phase and size

    def unmeasured_sizes(self, done: int) -> list[int]:
        """The sizes of the epochs after the first `done` that no measured epoch stands for."""
        return sorted({size for phase, _, size in self.epochs[done:] if (phase, size) not in self.measured})

    def seconds(self) -> dict[str, list[float]]:
        """The measured times as a checkpoint keeps them: {"<phase>/<size>": [seconds, ...]}."""
        return {f"{phase}/{size}": list(times) for (phase, size), times in self.measured.items()}

    def restore(self, seconds: dict[str, list[float]], unfrozen: str) -> None:
        """The measured times from a checkpoint. Keys without a phase ("224", from checkpoints
        written before phases were kept apart) are counted as `unfrozen` epochs, the run's most."""
        for key, times in seconds.items():
            phase, _, size = key.rpartition("/")
            self.measured[(phase or unfrozen, int(size))] = list(times)

    def estimate_from_steps(self, steps: dict[int, float]) -> None:
        for size, step in steps.items():
            self.estimate[size] = step * (self.train_batches + VALID_SHARE * self.valid_batches)

    def epoch_seconds(self, phase: str, size: int) -> float:
        # The median, so that one epoch slowed by other work on the machine moves the time left
        # little: taking the upper of two (9.3 and 3.3 min) once put 4 h 10 min left with about 95 to go.
        seen = self.measured.get((phase, size))
        return statistics.median(seen) if seen else self.estimate.get(size, 0.0)

    def left_after(self, index: int) -> float:
        """Seconds the epochs after the `index`-th (counted from 0) are expected to take."""
        return sum(self.epoch_seconds(phase, size) for phase, _, size in self.epochs[index + 1:])

    def index(self, phase: str, epoch: int) -> int:
        return next(i for i, (p, e, _) in enumerate(self.epochs) if (p, e) == (phase, epoch))

    def describe(self, done: int) -> str:
        counts: dict[int, int] = {}
        last_phase: dict[int, str] = {}  # each size's figure is its last phase's, the unfrozen one
        for phase, _, size in self.epochs[done:]:
            counts[size] = counts.get(size, 0) + 1
            last_phase[size] = phase
        parts = ", ".join(f"{n} at {size} px" for size, n in counts.items())
        total = self.left_after(done - 1)
        steps = "; ".join(f"{size} px {self.epoch_seconds(last_phase[size], size) / 60:.1f} min an epoch"
                          for size in counts)
        left = len(self.epochs) - done
        return (f"expected to take about {duration(total)} for {left} epoch{'s' * (left != 1)} ({parts}; "
                f"{steps}, {self.train_batches} training batches each)")


class Clock:
    """Per-epoch progress lines: the epoch, its time, validation accuracy and the time left."""

    def __init__(self, plan: Plan, stream=sys.stderr):
        self.plan, self.stream = plan, stream
        self.started = time.perf_counter()

    def epoch_started(self) -> None:
        self.started = time.perf_counter()

    def epoch_done(self, phase: str, epoch: int, accuracy: float | None) -> dict:
        took = time.perf_counter() - self.started
        i = self.plan.index(phase, epoch)
        size = self.plan.epochs[i][2]
        self.plan.measured.setdefault((phase, size), []).append(took)
        acc = f", validation accuracy {accuracy:.4f}" if accuracy is not None else ""
        left = self.plan.left_after(i)
        print(f"epoch {i + 1} of {len(self.plan.epochs)} ({phase}, {size} px): {took / 60:.1f} min{acc}; "
              + (f"about {duration(left)} left" if left else "the last one"), file=self.stream, flush=True)
        self.started = time.perf_counter()
        return self.plan.seconds()
