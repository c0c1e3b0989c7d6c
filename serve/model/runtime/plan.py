"""Which forward passes a set of inference threads will run: the batch sizes and intra-op thread
counts the runtime loads a compiled shape for (shapes.py), and how many callers each needs.

It is the runtime's question, asked by the loader, the export and the benchmarks; the threads
(serve/model/scheduler.py) only follow the plan.
"""

from __future__ import annotations

from dataclasses import dataclass


def warm_up_sizes(micro_batch: int) -> list[int]:
    """Batch sizes a shared thread sees: 1, the powers of two below micro_batch, and micro_batch."""
    return sorted({1, micro_batch} | {2 ** i for i in range(1, micro_batch.bit_length()) if 2 ** i < micro_batch})


@dataclass(frozen=True)
class PassPlan:
    """The forward passes a set of inference threads will run, for the runtime to load a compiled
    shape for each (shapes.py)."""

    workers: int = 1
    torch_threads: int = 1
    micro_batch: int = 1
    solo_threads: int = 0  # 0: no solo thread

    def passes(self) -> list[tuple[int, int]]:
        """(batch, intra-op threads) of every pass the threads warm up: the shared threads at each
        batch size they see, then the solo thread's single image."""
        shared = [(size, self.torch_threads) for size in warm_up_sizes(self.micro_batch)]
        return shared + ([(1, self.solo_threads)] if self.solo_threads else [])

    def callers(self, threads: int | None) -> int:
        """How many threads may run passes at once on a package built for `threads` intra-op
        threads (None: any count), each needing a model instance of its own."""
        count = self.workers if threads in (None, self.torch_threads) else 0
        count += 1 if self.solo_threads and threads in (None, self.solo_threads) else 0
        return max(1, count)
