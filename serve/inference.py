"""Where the model runs: a batch of uint8 images in, probabilities out.

Forward passes run on inference threads of their own, fed by one queue. A request can hand
over its undecoded upload with a function that prepares it (`run`), and the inference thread
decodes it right before the forward pass: then no more compute-heavy threads run than the
cores they were sized for, and a pass is not slowed by decodes preempting it. Measured on two
cores at eight concurrent clients, decoding on the HTTP threads instead cost a quarter of the
throughput.

Under load, `workers` shared threads of `torch_threads` intra-op threads each take the images
waiting (up to `max_batch`, split fairly between idle threads) and score them as one batch, so
requests that arrived during a pass share the next one and every core stays busy. `batch_wait`
can hold a short batch open a little longer.

A request that finds the server idle goes instead to a solo thread with `solo_threads`
intra-op threads, which has the machine to itself for that pass: on two cores one 288 px
image took 31 ms on two threads against 44 ms on one, while two single-threaded passes side by
side score 35% more images per second than two-threaded passes one after another. So a lone
request gets the low latency, and concurrent requests the throughput. Shared threads wait while a solo pass
runs, and a solo pass starts only when no other pass is running.

Each inference thread keeps one intra-op thread count for its whole life. Torch's count is per
calling thread, and oneDNN caches its convolution kernels per thread along with the thread
count they were built for, so a thread that kept switching would rebuild them every time.

Big batches do not pay on a small CPU: with EfficientNet-Lite0 at 288 px on two cores, a batch
of 4 or 8 costs more per image than a batch of 1 or 2 (its activations no longer fit in cache),
so the default stays small; it is the queue that keeps every core busy.
"""

from __future__ import annotations

import collections
import threading
import time

import torch


class ModelClosed(RuntimeError):
    """The model was shut down before the job could run."""


class _Job:
    __slots__ = ("batch", "prepare", "images", "result", "error", "done")

    def __init__(self, batch: torch.Tensor | None = None, prepare=None):
        self.batch = batch
        self.prepare = prepare  # called on the inference thread to make `batch`
        self.images = 1 if batch is None else batch.shape[0]
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class Model:
    def __init__(self, module: torch.jit.ScriptModule, workers: int = 1, torch_threads: int = 1,
                 max_batch: int = 1, batch_wait: float = 0.0, solo_threads: int = 1):
        self.module = module
        self.torch_threads = max(1, torch_threads)
        self.max_batch = max(1, max_batch)
        self.batch_wait = max(0.0, batch_wait)
        # A solo thread with no more intra-op threads than the shared ones would gain nothing.
        self.solo_threads = solo_threads if solo_threads > self.torch_threads else 0
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._idle = 0          # shared threads waiting for work
        self._running = 0       # passes in progress
        self._solo_running = False
        self._closed = False
        self._lock = threading.Lock()
        self._shared = threading.Condition(self._lock)
        self._solo = threading.Condition(self._lock)
        self._control: dict[int, tuple] = {}  # thread index -> (function, finished event, errors)
        self._threads = [threading.Thread(target=self._run_shared, args=(i,), name=f"whatcar-inference-{i}",
                                          daemon=True) for i in range(max(1, workers))]
        if self.solo_threads:
            self._threads.append(threading.Thread(target=self._run_solo, args=(len(self._threads),),
                                                  name="whatcar-inference-solo", daemon=True))
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] to float [N, classes] probabilities, scored on an inference thread
        (possibly together with other callers' images)."""
        return self._submit(_Job(batch))

    def run(self, prepare) -> torch.Tensor:
        """Probabilities [1, classes] for the uint8 [1, 3, H, W] image that `prepare()` returns,
        calling it on the inference thread; whatever it raises is raised here."""
        return self._submit(_Job(prepare=prepare))

    def _submit(self, job: _Job) -> torch.Tensor:
        with self._lock:
            if self._closed:
                raise ModelClosed("the model is shut down")
            self._queue.append(job)
            self._queued_images += job.images
            if self._solo_turn():
                self._solo.notify()
            else:
                self._shared.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def warm_up(self, height: int, width: int, rounds: int = 2) -> None:
        """Run the first passes now, on every inference thread and at every batch size it will
        see: TorchScript profiles and optimises during the first runs of each shape, and oneDNN
        builds its kernels per thread."""
        sizes = sorted({1, self.max_batch} | {2 ** i for i in range(1, self.max_batch.bit_length())
                                              if 2 ** i < self.max_batch})

        def warm(solo: bool):
            for size in [1] if solo else sizes:
                probe = torch.zeros((size, 3, height, width), dtype=torch.uint8)
                for _ in range(rounds):
                    self.module(probe)

        self._on_every_thread(warm)

    def close(self, timeout: float = 5.0) -> None:
        """Finish the jobs already queued, then stop the inference threads."""
        with self._lock:
            self._closed = True
            self._shared.notify_all()
            self._solo.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # ------------------------------------------------------------------ inference threads

    def _solo_turn(self) -> bool:
        """Whether the next pass belongs to the solo thread: it is enabled, nothing is running,
        and a single request is waiting. Called with the lock held."""
        return bool(self.solo_threads) and self._running == 0 and len(self._queue) == 1

    def _on_every_thread(self, fn) -> None:
        """Run fn(solo) once on each inference thread, all at the same time, and wait for them."""
        done = threading.Barrier(len(self._threads) + 1)
        errors: list[BaseException] = []
        with self._lock:
            for i in range(len(self._threads)):
                self._control[i] = (fn, done, errors)
            self._shared.notify_all()
            self._solo.notify_all()
        done.wait()
        if errors:
            raise errors[0]

    def _run_control(self, index: int, solo: bool) -> None:
        """Called with the lock held; runs this thread's control function without it."""
        fn, done, errors = self._control.pop(index)
        self._lock.release()
        try:
            with torch.inference_mode():
                fn(solo)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
            errors.append(exc)
        finally:
            done.wait()
            self._lock.acquire()

    def _take_shared(self, index: int) -> list[_Job] | None:
        """The next jobs for a shared thread, or None once closed and drained. Lock held."""
        while True:
            if index in self._control:
                self._run_control(index, solo=False)
                continue
            if self._queue and not self._solo_running and not self._solo_turn():
                break
            if self._closed and not self._queue:
                return None
            self._idle += 1
            self._shared.wait()
            self._idle -= 1
        if self.batch_wait and self._queued_images < self.max_batch and not self._closed:
            deadline = time.monotonic() + self.batch_wait
            while self._queued_images < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._shared.wait(remaining)
        # Leave a fair share for threads that are idle right now, so the cores split the work.
        share = -(-self._queued_images // (1 + self._idle))
        limit = max(1, min(self.max_batch, share))
        jobs, images = [], 0
        while self._queue:
            size = self._queue[0].images
            if jobs and images + size > limit:
                break
            jobs.append(self._queue.popleft())
            images += size
        self._queued_images -= images
        self._running += 1
        if self._queue and self._idle:
            self._shared.notify()
        return jobs

    def _take_solo(self, index: int) -> list[_Job] | None:
        while True:
            if index in self._control:
                self._run_control(index, solo=True)
                continue
            if self._solo_turn():
                break
            if self._closed and not self._queue:
                return None
            self._solo.wait()
        job = self._queue.popleft()
        self._queued_images -= job.images
        self._running += 1
        self._solo_running = True
        return [job]

    def _finish(self, solo: bool) -> None:
        """A pass ended: hand the machine to whoever should run next. Lock held."""
        self._running -= 1
        if solo:
            self._solo_running = False
        if self._closed:
            self._shared.notify_all()
            self._solo.notify_all()
        elif self._solo_turn():
            self._solo.notify()
        elif self._queue:
            self._shared.notify_all()

    def _run_shared(self, index: int) -> None:
        self._run(index, self.torch_threads, self._take_shared, solo=False)

    def _run_solo(self, index: int) -> None:
        self._run(index, self.solo_threads, self._take_solo, solo=True)

    def _run(self, index: int, threads: int, take, solo: bool) -> None:
        # A thread's first torch call adopts the count last set by any thread; make that happen
        # now, so the setting below is the one this thread keeps.
        torch.get_num_threads()
        torch.set_num_threads(threads)
        while True:
            with self._lock:
                jobs = take(index)
            if jobs is None:
                return
            ready = []
            try:
                for job in jobs:
                    if job.prepare is not None:
                        try:
                            job.batch = job.prepare()
                        except Exception as exc:  # noqa: BLE001 - this caller's own error, raised there
                            job.error = exc
                            continue
                    ready.append(job)
                if ready:
                    with torch.inference_mode():
                        batch = ready[0].batch if len(ready) == 1 else torch.cat([job.batch for job in ready])
                        probabilities = self.module(batch)
                    start = 0
                    for job in ready:
                        n = job.batch.shape[0]
                        job.result = probabilities[start:start + n]
                        start += n
            except BaseException as exc:  # noqa: BLE001 - every caller in the pass gets the error
                for job in ready:
                    job.error = exc
            finally:
                with self._lock:
                    self._finish(solo)
                for job in jobs:
                    job.done.set()
