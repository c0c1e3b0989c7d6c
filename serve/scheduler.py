"""Where the model runs: requests' images in, one probability row (or rejection) per image out.

A request hands over its images as they came, encoded files or pixels already at the model's
input size, and waits. Inference threads take waiting requests from one queue, decode them
right before the forward pass, and score them together. Decoding on the inference thread keeps
the compute-heavy threads to the number of cores they were sized for, so a pass is not slowed
by decodes preempting it: measured on two cores at eight concurrent clients, decoding on the
HTTP threads instead cost a quarter of the throughput.

Under load, `workers` shared threads of `torch_threads` intra-op threads each take the images
waiting (up to `micro_batch`, split fairly between idle threads) and score them as one batch,
so requests that arrived during a pass share the next one and every core stays busy.
`batch_wait` can hold a short batch open a little longer.

A request that finds the server idle goes instead to a solo thread with `solo_threads`
intra-op threads, which has the machine to itself for that pass: on two cores the 352 px
model's forward pass took 44 ms on two threads against 63 ms on one, while two single-threaded
streams side by side scored 30 images/s against 22 for one two-threaded stream
(docs/benchmark.md). So a lone request gets the low latency, and concurrent requests the
throughput. Shared threads wait while
a solo pass runs, and a solo pass starts only when no other pass is running.

Who runs next, and how many requests it takes, is decided by `plan_pass` and `hold_open`: pure
functions of the queue and the threads' state, tested without threads. The threads only keep
that state and follow the decisions.

Each inference thread keeps one intra-op thread count for its whole life. Torch's count is per
calling thread, and oneDNN caches its convolution kernels per thread along with the thread
count they were built for, so a thread that kept switching would rebuild them every time. For
the same reason each thread warms a model up, at every batch size it will see, before the model
counts as ready. The threads outlive the models: a reload hands the same threads the new model
(InferenceThreads says why).

Big batches do not pay on a small CPU: with EfficientNet-Lite0 on two cores, a batch of 4 or 8
costs more per image than a batch of 1 or 2 (its activations no longer fit in cache), so the
default stays small; it is the queue that keeps every core busy.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ImageRejected

# An encoded image file, or uint8 [3, H, W] pixels at the model's input size.
Item = bytes | torch.Tensor
# Told the seconds, the number of images and what ran it (a compiled shape such as "b1t1", or
# "torchscript") of every forward pass, from the thread that ran it.
PassObserver = Callable[[float, int, str], None]


class ModelClosed(RuntimeError):
    """The model was shut down before the request could run."""


# ---------------------------------------------------------------------- the policy


def plan_pass(waiting: Sequence[int], *, solo: bool, solo_enabled: bool, running: int, solo_running: bool,
              idle_shared: int, micro_batch: int) -> int:
    """How many waiting requests, from the front of the queue, the asking thread takes for its
    next pass; 0 means it waits.

    `waiting` holds each waiting request's image count, oldest first; `solo` says whether the
    asker is the solo thread; `running` counts passes in progress; `idle_shared` counts the
    other shared threads waiting for work.
    """
    if not waiting:
        return 0
    solo_turn = solo_enabled and running == 0 and len(waiting) == 1
    if solo:
        return 1 if solo_turn else 0
    if solo_running or solo_turn:
        return 0
    # Leave a fair share for threads that are idle right now, so the cores split the work.
    share = -(-sum(waiting) // (1 + idle_shared))
    limit = max(1, min(micro_batch, share))
    taken = images = 0
    for size in waiting:
        # A request is never split, so one larger than the limit goes alone.
        if taken and images + size > limit:
            break
        taken += 1
        images += size
    return taken


def hold_open(images_waiting: int, micro_batch: int, waited: float, batch_wait: float) -> float:
    """Seconds a shared thread should still wait for more images before scoring a batch short of
    `micro_batch`, having waited `waited` already; 0 means go now."""
    if batch_wait <= 0 or images_waiting >= micro_batch:
        return 0.0
    return max(0.0, batch_wait - waited)


def warm_up_sizes(micro_batch: int) -> list[int]:
    """Batch sizes a shared thread sees: 1, the powers of two below micro_batch, and micro_batch."""
    return sorted({1, micro_batch} | {2 ** i for i in range(1, micro_batch.bit_length()) if 2 ** i < micro_batch})


@dataclass(frozen=True)
class PassPlan:
    """The forward passes a set of inference threads will run, for the runtime to load a compiled
    shape for each (serve/runtime/shapes.py)."""

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


# ---------------------------------------------------------------------- requests


@dataclass
class Scored:
    """One request's outcome and where its time went, in seconds."""

    rows: list  # per image: float [classes] probabilities, or the ImageRejected that stopped it
    queue: float = 0.0       # from hand-over until an inference thread took it
    preprocess: float = 0.0  # decoding and preprocessing its images, on the inference thread
    forward: float = 0.0     # the forward pass it was part of
    batch_size: int = 0      # images in that forward pass (other requests' included)
    ran: str = ""            # what ran that pass: a compiled shape such as "b1t1", or "torchscript"

    @property
    def rejected(self) -> ImageRejected | None:
        """The first rejected image's error, if any."""
        return next((row for row in self.rows if isinstance(row, ImageRejected)), None)


@dataclass
class _Request:
    model: Model
    items: list
    all_or_nothing: bool
    handed_over: float = field(default_factory=time.perf_counter)
    scored: Scored = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.scored = Scored(rows=[None] * len(self.items))


# ---------------------------------------------------------------------- the threads


class _Record:
    """What the threads keep about one attached model, under their lock: requests handed over and
    not done, thread warm-ups not done and what they raised, and whether it takes requests."""

    __slots__ = ("outstanding", "warming", "errors", "ready", "closed")

    def __init__(self, warming: int):
        self.outstanding = 0
        self.warming = warming
        self.errors: list[BaseException] = []
        self.ready = threading.Event()
        self.closed = False

    def warmed(self, error: BaseException | None) -> None:
        if error is not None:
            self.errors.append(error)
        self.warming -= 1
        if self.warming == 0:
            self.ready.set()


class InferenceThreads:
    """The threads that run forward passes, and the queue they take requests from.

    They outlive the models they run: a model attaches, is warmed up on every thread, gets its
    requests scored, and detaches; a reload attaches the new model while the old one still has
    requests inside, and a pass only ever holds one model's requests. The threads start when the
    first model attaches and stop when the last one detaches.

    Why not a set of threads per model: every new thread that allocates gets a glibc malloc
    arena of its own, and the space a pass frees stays in the arena, at the top of its heap,
    where malloc_trim does not reach. Starting a new set for each model left the old sets'
    arenas resident: on two cores at eight clients, 1.4x a fresh server's memory after 10 swaps
    and 1.7x after 20; with the threads kept (and loads on one thread, serve/live_model.py), 0.97x
    after 20 (docs/benchmark.md, "Model swaps under load").
    """

    def __init__(self, workers: int = 1, torch_threads: int = 1, micro_batch: int = 1, batch_wait: float = 0.0,
                 solo_threads: int = 1):
        self.shared = max(1, workers)
        self.torch_threads = max(1, torch_threads)
        self.micro_batch = max(1, micro_batch)
        self.batch_wait = max(0.0, batch_wait)
        # A solo thread with no more intra-op threads than the shared ones would gain nothing.
        self.solo_threads = solo_threads if solo_threads > self.torch_threads else 0
        self._queue: collections.deque[_Request] = collections.deque()
        self._idle_shared = 0
        self._running = 0
        self._solo_running = False
        self._changed = threading.Condition()
        self._records: dict[Model, _Record] = {}
        # Per thread, the models it has yet to warm up; it does that before taking requests.
        self._warm_ups: list[collections.deque[Model]] = []
        self._threads: list[threading.Thread] = []
        # Bumped to stop the threads: each one runs for the generation it was started in.
        self._generation = 0
        self._lifecycle = threading.Lock()  # one attach or detach at a time

    @property
    def workers(self) -> int:
        """How many threads run passes (and so may run at once): the shared ones and the solo one."""
        return self.shared + (1 if self.solo_threads else 0)

    @property
    def plan(self) -> PassPlan:
        return PassPlan(self.shared, self.torch_threads, self.micro_batch, self.solo_threads)

    @property
    def threads(self) -> list[threading.Thread]:
        """The threads running now (none while no model is attached)."""
        return list(self._threads)

    @property
    def waiting(self) -> int:
        """How many requests are queued and not yet taken into a pass."""
        with self._changed:
            return len(self._queue)

    def attach(self, model: Model) -> None:
        """Run `model` too: every thread warms it up before taking more requests. Starts the
        threads if none run."""
        with self._lifecycle, self._changed:
            if not self._threads:
                self._start()
            self._records[model] = _Record(warming=len(self._warm_ups))
            for pending in self._warm_ups:
                pending.append(model)
            self._changed.notify_all()

    def wait_ready(self, model: Model, timeout: float | None = None) -> None:
        """Block until every thread has warmed `model` up; raise what a warm-up raised."""
        with self._changed:
            record = self._records.get(model)
        if record is None:
            raise ModelClosed("the model was shut down before it warmed up")
        if not record.ready.wait(timeout):
            raise TimeoutError(f"the inference threads did not warm up within {timeout} s")
        if record.errors:
            raise record.errors[0]

    def detach(self, model: Model, timeout: float = 5.0) -> None:
        """Take no more requests for `model`, and stop running it once the requests it was handed
        are done; stop the threads once no model is left."""
        with self._changed:
            record = self._records.get(model)
            if record is None:
                return
            record.closed = True
            for pending in self._warm_ups:
                if model in pending:
                    pending.remove(model)
                    record.warmed(ModelClosed("the model was shut down before it warmed up"))
            deadline = time.monotonic() + timeout
            while record.outstanding or record.warming:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
        with self._lifecycle:
            with self._changed:
                if self._records.pop(model, None) is None:
                    return
                if self._records:
                    return
                stopping, self._threads, self._warm_ups = self._threads, [], []
                self._generation += 1
                self._changed.notify_all()
            for thread in stopping:
                thread.join(timeout)

    def submit(self, request: _Request) -> None:
        with self._changed:
            record = self._records.get(request.model)
            if record is None or record.closed:
                raise ModelClosed("the model is shut down")
            self._queue.append(request)
            record.outstanding += 1
            self._changed.notify_all()

    def _start(self) -> None:
        roles = [(f"whatcar-inference-{i}", False) for i in range(self.shared)]
        if self.solo_threads:
            roles.append(("whatcar-inference-solo", True))
        self._warm_ups = [collections.deque() for _ in roles]
        self._threads = [threading.Thread(target=self._serve, args=(index, solo, self._generation), name=name,
                                          daemon=True) for index, (name, solo) in enumerate(roles)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ on an inference thread

    def _serve(self, index: int, solo: bool, generation: int) -> None:
        # A thread's first torch call adopts the count last set by any thread; make that happen
        # now, so the setting below is the one this thread keeps.
        torch.get_num_threads()
        torch.set_num_threads(self.solo_threads if solo else self.torch_threads)
        pending = self._warm_ups[index]
        while True:
            job = self._take(pending, solo, generation)
            if job is None:
                return
            if isinstance(job, Model):
                self._warm_up(job, [1] if solo else warm_up_sizes(self.micro_batch))
                continue
            model, requests = job
            try:
                self._run_pass(model, requests)
            finally:
                with self._changed:
                    self._running -= 1
                    if solo:
                        self._solo_running = False
                    self._records[model].outstanding -= len(requests)
                    self._changed.notify_all()
                for request in requests:
                    request.done.set()

    def _warm_up(self, model: Model, sizes: list[int]) -> None:
        """The model's first passes on this thread, at each batch size it will see: TorchScript
        profiles and optimises during the first runs of each shape, and oneDNN builds kernels
        per thread."""
        height, width = model.input_size
        error = None
        try:
            with torch.inference_mode():
                for size in sizes:
                    probe = torch.zeros((size, 3, height, width), dtype=torch.uint8)
                    for _ in range(model.warm_up_rounds):
                        model.runner(probe)
        except BaseException as exc:  # noqa: BLE001 - reported by wait_ready
            error = exc
        with self._changed:
            record = self._records.get(model)
            if record is not None:  # None: detached while this thread warmed it up
                record.warmed(error)
            self._changed.notify_all()

    def _take(self, pending: collections.deque, solo: bool, generation: int):
        """This thread's next job: a model to warm up, (model, requests) for a pass, or None
        once stopped and drained."""
        with self._changed:
            found_work = None
            while True:
                if pending:
                    return pending.popleft()
                # A pass holds one model's requests: those at the front of the queue.
                front = self._queue[0].model if self._queue else None
                waiting = [len(request.items) for request in
                           itertools.takewhile(lambda request, front=front: request.model is front, self._queue)]
                take = plan_pass(waiting, solo=solo, solo_enabled=bool(self.solo_threads), running=self._running,
                                 solo_running=self._solo_running, idle_shared=self._idle_shared,
                                 micro_batch=self.micro_batch)
                if take and not solo:
                    found_work = found_work if found_work is not None else time.monotonic()
                    wait = hold_open(sum(waiting), self.micro_batch, time.monotonic() - found_work, self.batch_wait)
                    if wait > 0:
                        self._changed.wait(wait)
                        continue
                if take:
                    break
                if generation != self._generation and not self._queue:
                    return None
                found_work = None
                if not solo:
                    self._idle_shared += 1
                self._changed.wait()
                if not solo:
                    self._idle_shared -= 1
            requests = [self._queue.popleft() for _ in range(take)]
            self._running += 1
            if solo:
                self._solo_running = True
            self._changed.notify_all()
            return front, requests

    def _run_pass(self, model: Model, requests: list[_Request]) -> None:
        started = time.perf_counter()
        pixels, owners = [], []
        for request in requests:
            scored = request.scored
            scored.queue = started - request.handed_over
            t0 = time.perf_counter()
            try:
                mine = _prepare(model.preprocess, request)
            except Exception as exc:  # noqa: BLE001 - not a bad image but a fault: that caller raises it
                request.error = exc
                mine = []
            scored.preprocess = time.perf_counter() - t0
            for index, tensor in mine:
                pixels.append(tensor)
                owners.append((scored, index))
        if not pixels:
            return
        try:
            with torch.inference_mode():
                batch = pixels[0].unsqueeze(0) if len(pixels) == 1 else torch.stack(pixels)
                ran = model.ran(len(pixels))
                t0 = time.perf_counter()
                probabilities = model.runner(batch)
                forward = time.perf_counter() - t0
            for (scored, index), row in zip(owners, probabilities):
                scored.rows[index] = row
                scored.forward, scored.batch_size, scored.ran = forward, len(pixels), ran
            if model.observer is not None:
                model.observer(forward, len(pixels), ran)
        except BaseException as exc:  # noqa: BLE001 - every caller in the pass gets the error
            for request in requests:
                request.error = request.error or exc


def _prepare(preprocess, request: _Request) -> list[tuple[int, torch.Tensor]]:
    """(index, pixels) of each of the request's images that can be scored; rejections go in
    its rows."""
    ready = []
    for index, item in enumerate(request.items):
        if isinstance(item, torch.Tensor):
            ready.append((index, item))
            continue
        try:
            ready.append((index, preprocess(item)))
        except ImageRejected as exc:
            request.scored.rows[index] = exc
            if request.all_or_nothing:
                return []
    return ready


# ---------------------------------------------------------------------- a model on the threads


class Model:
    """One loaded model, run by inference threads.

    `runner` maps uint8 [N, 3, H, W] to float [N, width] (see serve/runtime/rows.py); `preprocess` maps an
    encoded image to uint8 [3, H, W] or raises ImageRejected. `threads` are the inference
    threads to run on, shared with the models before and after this one; without them the model
    starts a set of its own from `settings` (InferenceThreads' arguments), which stops with it.
    Every thread warms the model up at once; `wait_ready` returns when all of them have.
    """

    def __init__(self, runner, preprocess, input_size: tuple[int, int], threads: InferenceThreads | None = None,
                 observer: PassObserver | None = None, warm_up_rounds: int = 2, **settings):
        if threads is not None and settings:
            raise TypeError(f"thread settings {sorted(settings)} belong to the InferenceThreads passed in")
        self.runner = runner
        self.preprocess = preprocess
        self.input_size = input_size
        self.observer = observer
        self.warm_up_rounds = warm_up_rounds
        self.threads = threads if threads is not None else InferenceThreads(**settings)
        self.threads.attach(self)

    @property
    def workers(self) -> int:
        return self.threads.workers

    def ran(self, batch: int) -> str:
        """What runs a pass of `batch` images on the calling thread, as the runner names it."""
        name = getattr(self.runner, "ran", None)
        return name(batch) if name is not None else type(self.runner).__name__

    @property
    def solo_threads(self) -> int:
        return self.threads.solo_threads

    def score(self, items: list[Item], all_or_nothing: bool = False) -> Scored:
        """Score one request's images together, on an inference thread, possibly in one pass with
        other requests. With `all_or_nothing`, a rejected image keeps the others out of the
        forward pass (the request will fail as a whole anyway)."""
        request = _Request(self, list(items), all_or_nothing)
        self.threads.submit(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.scored

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every thread has warmed up; raise what a warm-up raised."""
        self.threads.wait_ready(self, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Finish the requests already handed over, then leave the inference threads (which
        stop if no other model uses them)."""
        self.threads.detach(self, timeout)
