"""Where the model runs: a batch of uint8 images in, probabilities out.

Forward passes run on a few inference threads of their own, fed by one queue. A thread that
comes free takes the images waiting (up to `max_batch`) and scores them as one batch, so under
load requests that arrived during the previous pass share the next one, and a lone request is
never held back. `batch_wait` can hold a short batch open a little longer.

Big batches do not pay on a small CPU: with EfficientNet-Lite0 at 288 px on two cores, a batch
of 4 or 8 costs more per image than a batch of 1 or 2 (its activations no longer fit in cache),
so the default stays small; it is the queue that keeps every core busy.

Torch's intra-op thread count is per calling thread, so each inference thread sets its own:
`workers` threads of `torch_threads` each should not exceed the CPUs the process has.
"""

from __future__ import annotations

import collections
import threading
import time

import torch


class ModelClosed(RuntimeError):
    """The model was shut down before the job could run."""


class _Job:
    __slots__ = ("batch", "control", "result", "error", "done")

    def __init__(self, batch: torch.Tensor, control=None):
        self.batch = batch
        self.control = control  # (function, barrier) to run on an inference thread instead
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class Model:
    def __init__(self, module: torch.jit.ScriptModule, workers: int = 1, torch_threads: int = 1,
                 max_batch: int = 1, batch_wait: float = 0.0):
        self.module = module
        self.torch_threads = max(1, torch_threads)
        self.max_batch = max(1, max_batch)
        self.batch_wait = max(0.0, batch_wait)
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._idle = 0
        self._closed = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name=f"whatcar-inference-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] to float [N, classes] probabilities, scored on an inference thread
        (possibly together with other callers' images)."""
        job = _Job(batch)
        with self._cond:
            if self._closed:
                raise ModelClosed("the model is shut down")
            self._queue.append(job)
            self._queued_images += batch.shape[0]
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def warm_up(self, height: int, width: int, rounds: int = 2) -> None:
        """Run the first passes now, on every inference thread and at every batch size they
        will see: TorchScript profiles and optimises during the first runs of each shape."""
        sizes = sorted({1, self.max_batch} | {2 ** i for i in range(1, self.max_batch.bit_length()) if 2 ** i < self.max_batch})
        barrier = threading.Barrier(self.workers)

        def warm():
            for size in sizes:
                probe = torch.zeros((size, 3, height, width), dtype=torch.uint8)
                for _ in range(rounds):
                    self.module(probe)

        self._broadcast(warm, barrier)

    def close(self, timeout: float = 5.0) -> None:
        """Finish the jobs already queued, then stop the inference threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # ------------------------------------------------------------------ inference threads

    def _broadcast(self, fn, barrier: threading.Barrier) -> None:
        """Run `fn` once on each inference thread (the barrier keeps one thread from taking two)."""
        jobs = []
        with self._cond:
            for _ in self._threads:
                job = _Job(torch.empty(0), control=(fn, barrier))
                jobs.append(job)
                self._queue.append(job)
            self._cond.notify_all()
        for job in jobs:
            job.done.wait()
            if job.error is not None:
                raise job.error

    def _take(self) -> list[_Job] | None:
        """The next jobs to score together, or None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._idle += 1
                self._cond.wait()
                self._idle -= 1
            if self._queue[0].control is not None:  # runs alone
                return [self._queue.popleft()]
            if self.batch_wait and self._queued_images < self.max_batch and not self._closed:
                deadline = time.monotonic() + self.batch_wait
                while self._queued_images < self.max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            # Leave a fair share for threads that are idle right now, so the cores split the work.
            share = -(-self._queued_images // (1 + self._idle))
            limit = max(1, min(self.max_batch, share))
            jobs, images = [], 0
            while self._queue and self._queue[0].control is None:
                size = self._queue[0].batch.shape[0]
                if jobs and images + size > limit:
                    break
                jobs.append(self._queue.popleft())
                images += size
            self._queued_images -= images
            if self._queue and self._idle:
                self._cond.notify()
            return jobs

    def _run(self) -> None:
        torch.set_num_threads(self.torch_threads)
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if jobs[0].control is not None:
                fn, barrier = jobs[0].control
                try:
                    barrier.wait()
                    with torch.inference_mode():
                        fn()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                    jobs[0].error = exc
                jobs[0].done.set()
                continue
            try:
                with torch.inference_mode():
                    batch = jobs[0].batch if len(jobs) == 1 else torch.cat([job.batch for job in jobs])
                    probabilities = self.module(batch)
                start = 0
                for job in jobs:
                    n = job.batch.shape[0]
                    job.result = probabilities[start:start + n]
                    start += n
            except BaseException as exc:  # noqa: BLE001 - every caller in the batch gets the error
                for job in jobs:
                    job.error = exc
            finally:
                for job in jobs:
                    job.done.set()
