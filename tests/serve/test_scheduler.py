"""The inference stage: the scheduling policy on its own, then the threads that follow it.
Batching callers together must never mix up whose row is whose."""

import threading
import time

import pytest
import torch

from serve.errors import UndecodableImage
from serve.scheduler import InferenceThreads, Model, ModelClosed, hold_open, plan_pass, warm_up_sizes
from tests.support.waiting import wait_for

# ---------------------------------------------------------------------- the policy, no threads


def shared(waiting, running=0, solo_running=False, idle=0, micro_batch=2, solo_enabled=False):
    return plan_pass(waiting, solo=False, solo_enabled=solo_enabled, running=running, solo_running=solo_running,
                     idle_shared=idle, micro_batch=micro_batch)


def solo(waiting, running=0):
    return plan_pass(waiting, solo=True, solo_enabled=True, running=running, solo_running=False, idle_shared=0,
                     micro_batch=2)


def test_nothing_waiting_means_waiting():
    assert shared([]) == 0 and solo([]) == 0


def test_a_shared_thread_takes_up_to_the_micro_batch():
    assert shared([1, 1, 1, 1], micro_batch=2) == 2
    assert shared([1, 1, 1, 1], micro_batch=4) == 4
    assert shared([1], micro_batch=4) == 1


def test_idle_threads_get_a_fair_share():
    # Four images, micro-batch 4, one other thread idle: two each, not four for the first to ask.
    assert shared([1, 1, 1, 1], micro_batch=4, idle=1) == 2
    assert shared([1, 1, 1], micro_batch=4, idle=1) == 2
    assert shared([1, 1], micro_batch=4, idle=3) == 1


def test_a_request_is_never_split_and_a_large_one_goes_alone():
    assert shared([5, 1], micro_batch=2) == 1
    assert shared([1, 5], micro_batch=2) == 1
    assert shared([2, 1], micro_batch=3) == 2


def test_a_lone_request_on_an_idle_server_belongs_to_the_solo_thread():
    assert solo([1]) == 1
    assert shared([1], solo_enabled=True) == 0


def test_the_solo_thread_waits_while_anything_runs_or_several_wait():
    assert solo([1], running=1) == 0
    assert solo([1, 1]) == 0
    assert shared([1, 1], solo_enabled=True) == 2


def test_shared_threads_wait_while_a_solo_pass_runs():
    assert shared([1, 1], running=1, solo_running=True, solo_enabled=True) == 0


def test_without_a_solo_thread_a_lone_request_goes_to_a_shared_one():
    assert shared([1], solo_enabled=False) == 1


def test_hold_open_waits_only_for_a_short_batch_and_only_so_long():
    assert hold_open(1, 4, waited=0.0, batch_wait=0.0) == 0
    assert hold_open(4, 4, waited=0.0, batch_wait=0.5) == 0
    assert hold_open(1, 4, waited=0.2, batch_wait=0.5) == pytest.approx(0.3)
    assert hold_open(1, 4, waited=0.7, batch_wait=0.5) == 0


def test_warm_up_covers_every_batch_size_a_thread_sees():
    assert warm_up_sizes(1) == [1]
    assert warm_up_sizes(2) == [1, 2]
    assert warm_up_sizes(6) == [1, 2, 4, 6]


# ---------------------------------------------------------------------- the threads


class Recorder:
    """Stands in for the model: row i is [mean of image i, -mean], and every call after warm-up is
    recorded with its batch size, thread and torch thread count."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None, gate: threading.Event | None = None):
        self.delay = delay
        self.gate = gate
        self.fail_on = fail_on
        self.calls: list[tuple[int, str, int]] = []
        self.warm_ups: list[tuple[int, str, int]] = []
        self.active = 0
        self.most_active = 0
        self.intervals: list[tuple[float, float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        call = (batch.shape[0], threading.current_thread().name, torch.get_num_threads())
        if not batch.any():  # the warm-up's all-zero probes
            with self.lock:
                self.warm_ups.append(call)
            return torch.zeros(batch.shape[0], 2)
        with self.lock:
            self.calls.append(call)
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        started = time.monotonic()
        try:
            if self.gate is not None:
                self.gate.wait(10)  # held inside the pass until the test opens it
            time.sleep(self.delay)
            means = batch.float().mean(dim=(1, 2, 3))
            if self.fail_on is not None and bool((means == self.fail_on).any()):
                raise RuntimeError("bad batch")
            return torch.stack([means, -means], dim=1)
        finally:
            with self.lock:
                self.active -= 1
                self.intervals.append((started, time.monotonic(), threading.current_thread().name))


def image(value: int) -> torch.Tensor:
    return torch.full((3, 4, 4), value, dtype=torch.uint8)


def decode_number(data: bytes) -> torch.Tensor:
    """A stand-in preprocessor: b"7" becomes an image of sevens; b"bad" is rejected."""
    if data == b"bad":
        raise UndecodableImage("not a number")
    return image(int(data))


def model_with(runner, **settings) -> Model:
    model = Model(runner, decode_number, (4, 4), **settings)
    model.wait_ready(10)
    return model


def row(value: int) -> list[float]:
    return [float(value), -float(value)]


def run_concurrently(fn, args: list[tuple], timeout: float = 10) -> None:
    """fn(*a) for every a in args, each on its own thread; returns when all have finished."""
    threads = [threading.Thread(target=fn, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def call_all(model: Model, values: list[int]) -> dict:
    results, errors = {}, {}
    start = threading.Barrier(len(values))

    def one(v):
        start.wait()
        try:
            results[v] = model.score([image(v)]).rows[0]
        except Exception as exc:  # noqa: BLE001 - the test compares whatever each caller got
            errors[v] = exc

    run_concurrently(one, [(v,) for v in values])
    return {"results": results, "errors": errors}


def test_concurrent_callers_get_their_own_rows_from_shared_batches():
    module = Recorder(delay=0.05)
    model = model_with(module, workers=1, micro_batch=8)
    try:
        out = call_all(model, list(range(1, 13)))
    finally:
        model.close()
    assert not out["errors"]
    for v, got in out["results"].items():
        assert got.tolist() == row(v)
    sizes = [size for size, _, _ in module.calls]
    assert sum(sizes) == 12
    assert max(sizes) > 1, "callers that waited together were not batched"
    assert max(sizes) <= 8


def test_a_lone_request_is_not_held_back_for_a_batch():
    module = Recorder()
    model = model_with(module, workers=1, micro_batch=8)
    try:
        for v in (3, 4, 5):
            assert model.score([image(v)]).rows[0].tolist() == row(v)
    finally:
        model.close()
    assert [size for size, _, _ in module.calls] == [1, 1, 1]


def test_a_multi_image_request_keeps_its_order_and_is_never_split():
    module = Recorder()
    model = model_with(module, workers=1, micro_batch=2)
    try:
        scored = model.score([image(v) for v in (9, 1, 7, 3, 5)])
    finally:
        model.close()
    assert [r[0] for r in torch.stack(scored.rows).tolist()] == [9.0, 1.0, 7.0, 3.0, 5.0]
    assert [size for size, _, _ in module.calls] == [5]
    assert scored.batch_size == 5


def test_workers_share_the_queue_and_set_their_torch_threads():
    module = Recorder(delay=0.05)
    model = model_with(module, workers=2, torch_threads=1, micro_batch=4)
    try:
        out = call_all(model, list(range(1, 9)))
    finally:
        model.close()
    assert not out["errors"] and len(out["results"]) == 8
    assert module.most_active == 2, "the two inference threads did not run at the same time"
    assert {threads for _, _, threads in module.calls} == {1}
    assert len({name for _, name, _ in module.calls}) == 2


def test_an_error_reaches_every_caller_in_the_batch_and_the_model_carries_on():
    module = Recorder(delay=0.05, fail_on=2)
    model = model_with(module, workers=1, micro_batch=8)
    try:
        out = call_all(model, [1, 2, 3, 4])
        assert 2 in out["errors"] and isinstance(out["errors"][2], RuntimeError)
        # Whoever shared a batch with the bad image failed with it; nobody got someone else's row.
        for v, got in out["results"].items():
            assert got.tolist() == row(v)
        assert model.score([image(6)]).rows[0].tolist() == row(6)
    finally:
        model.close()


def test_batch_wait_holds_a_short_batch_open():
    module = Recorder()
    model = model_with(module, workers=1, micro_batch=4, batch_wait=0.3)
    results = {}

    def one(v, delay):
        time.sleep(delay)
        results[v] = model.score([image(v)]).rows[0]

    try:
        run_concurrently(one, [(1, 0.0), (2, 0.05)], timeout=5)
    finally:
        model.close()
    assert [size for size, _, _ in module.calls] == [2]
    assert results[2].tolist() == row(2)


def test_each_inference_thread_warms_itself_at_each_batch_size_before_ready():
    module = Recorder()
    model = Model(module, decode_number, (4, 4), workers=2, torch_threads=1, micro_batch=4, solo_threads=2,
                  warm_up_rounds=1)
    try:
        model.wait_ready(10)
        warmed = list(module.warm_ups)
    finally:
        model.close()
    names = {name for _, name, _ in warmed}
    assert names == {"whatcar-inference-0", "whatcar-inference-1", "whatcar-inference-solo"}
    for name in names - {"whatcar-inference-solo"}:
        assert sorted(size for size, who, _ in warmed if who == name) == [1, 2, 4]
    # The solo thread only ever takes one request alone, on all its threads.
    assert [(size, threads) for size, who, threads in warmed if who == "whatcar-inference-solo"] == [(1, 2)]


def test_a_warm_up_that_fails_is_reported_by_wait_ready():
    def broken(batch):
        raise RuntimeError("cannot run this shape")

    model = Model(broken, decode_number, (4, 4), workers=1)
    try:
        with pytest.raises(RuntimeError, match="cannot run this shape"):
            model.wait_ready(10)
    finally:
        model.close()


def test_closed_model_refuses_new_work():
    model = model_with(Recorder(), workers=1)
    model.close()
    with pytest.raises(ModelClosed):
        model.score([image(1)])


def test_each_pass_is_reported_with_its_real_batch_size():
    module = Recorder(delay=0.1)
    passes = []
    model = model_with(module, workers=1, micro_batch=2,
                       observer=lambda seconds, n, ran: passes.append((seconds, n)) or ran_by.append(ran))
    ran_by = []
    results = {}

    def one(v, delay):
        time.sleep(delay)
        results[v] = model.score([image(v)])

    try:
        # The first request keeps the only thread busy; the two that arrive meanwhile share a pass.
        run_concurrently(one, [(1, 0.0), (2, 0.03), (3, 0.03)])
    finally:
        model.close()
    assert sorted(n for _, n in passes) == [1, 2]
    assert all(seconds >= 0.1 for seconds, _ in passes)
    assert sorted(r.batch_size for r in results.values()) == [1, 2, 2]
    # A runner that does not name its passes is named by its type.
    assert ran_by == ["Recorder"] * 2 and {r.ran for r in results.values()} == {"Recorder"}
    # Whoever went second waited through the other pass: that is queue time, not forward time.
    assert max(r.queue for r in results.values()) >= 0.06
    assert all(r.forward >= 0.1 for r in results.values())


def test_photos_scored_together_get_the_answers_they_get_alone(handler):
    """The real model and preprocessor: shared batches change nothing a client sees."""
    from tests.support.paths import car_photos

    artifact, preprocessor = handler.artifact, handler.model.preprocess
    photos = car_photos()[::3]
    alone = {}
    for path in photos:
        with torch.inference_mode():
            alone[path] = artifact.runner(preprocessor(path.read_bytes()).unsqueeze(0))[0]
    sizes = []

    def module(batch):
        if batch.any():
            sizes.append(batch.shape[0])
        return artifact.runner(batch)

    model = Model(module, preprocessor, artifact.input_size, workers=1, micro_batch=4)
    answers = {}
    start = threading.Barrier(len(photos))

    def one(path):
        start.wait()
        answers[path] = model.score([path.read_bytes()]).rows[0]

    try:
        model.wait_ready(60)
        run_concurrently(one, [(p,) for p in photos], timeout=60)
    finally:
        model.close()
    assert len(answers) == len(photos)
    assert max(sizes) > 1 and sum(sizes) == len(photos)
    for path, got in answers.items():
        assert int(got.argmax()) == int(alone[path].argmax())
        assert float((got - alone[path]).abs().max()) < 1e-4


def test_batching_settings_come_from_flags_and_environment():
    from serve.config import ConfigError, load_config
    from tests.support.paths import ARTIFACTS

    env = {"WHATCAR_MICRO_BATCH": "4", "WHATCAR_BATCH_WAIT_MS": "2.5"}
    config = load_config(["--model-dir", str(ARTIFACTS)], environ=env)
    assert config.micro_batch == 4 and config.batch_wait_ms == 2.5
    assert load_config(["--model-dir", str(ARTIFACTS), "--micro-batch", "1"], environ=env).micro_batch == 1
    with pytest.raises(ConfigError, match="micro_batch must be at least 1"):
        load_config(["--model-dir", str(ARTIFACTS), "--micro-batch", "0"], environ={})
    with pytest.raises(ConfigError, match="WHATCAR_BATCH_WAIT_MS"):
        load_config(["--model-dir", str(ARTIFACTS)], environ={"WHATCAR_BATCH_WAIT_MS": "-1"})


SOLO = "whatcar-inference-solo"


def test_a_request_that_finds_the_server_idle_gets_every_core():
    module = Recorder()
    model = model_with(module, workers=2, torch_threads=1, micro_batch=2, solo_threads=2)
    try:
        for v in (1, 2, 3):
            assert model.score([image(v)]).rows[0].tolist() == row(v)
    finally:
        model.close()
    assert module.calls == [(1, SOLO, 2)] * 3


def test_concurrent_requests_share_the_cores_and_never_overlap_a_solo_pass():
    module = Recorder(delay=0.03)
    model = model_with(module, workers=2, torch_threads=1, micro_batch=2, solo_threads=2)
    try:
        out = call_all(model, list(range(1, 17)))
    finally:
        model.close()
    assert not out["errors"]
    for v, got in out["results"].items():
        assert got.tolist() == row(v)
    by_shared = [(size, threads) for size, name, threads in module.calls if name != SOLO]
    assert by_shared and {threads for _, threads in by_shared} == {1}
    assert module.most_active == 2, "the shared threads did not run side by side"
    for start, end, name in module.intervals:
        if name == SOLO:
            others = [(s, e) for s, e, n in module.intervals if (s, e, n) != (start, end, name)]
            assert all(e <= start or s >= end for s, e in others), "a pass ran during a solo pass"


def test_all_threads_stop_on_close():
    model = model_with(Recorder(), workers=2, torch_threads=1, micro_batch=2, solo_threads=2)
    threads = model.threads.threads
    assert len(threads) == 3 and all(thread.is_alive() for thread in threads)
    model.close(timeout=5)
    assert not any(thread.is_alive() for thread in threads) and not model.threads.threads


def test_models_on_shared_threads_never_share_a_pass_and_the_threads_outlive_each():
    threads = InferenceThreads(workers=1, torch_threads=1, micro_batch=8)
    gate = threading.Event()
    old_module, new_module = Recorder(gate=gate), Recorder()
    old = Model(old_module, decode_number, (4, 4), threads, warm_up_rounds=1)
    old.wait_ready(10)
    started = threads.threads
    new = Model(new_module, decode_number, (4, 4), threads, warm_up_rounds=1)
    results, callers = {}, []

    def one(model, v):
        results[(model is new, v)] = model.score([image(v)]).rows[0]

    def call(model, v):
        callers.append(threading.Thread(target=one, args=(model, v)))
        callers[-1].start()

    try:
        new.wait_ready(10)
        # The old model's first request holds the only thread inside its pass while the others
        # queue one at a time, so the queue's order is known: runs of each model, interleaved.
        call(old, 1)
        wait_for(lambda: old_module.active == 1, "the first pass")
        for queued, (model, v) in enumerate([(new, 2), (new, 4), (old, 3), (old, 5), (old, 7), (new, 6), (new, 8)]):
            call(model, v)
            wait_for(lambda queued=queued: threads.waiting == queued + 1, f"request {v} to queue", timeout=10)
        gate.set()
        for caller in callers:
            caller.join(10)
        assert threads.threads == started, "the new model got threads of its own"
        # The new model warmed up on the very thread that serves the old one.
        assert {name for _, name, _ in new_module.warm_ups} == {started[0].name}
        old.close()
        assert all(thread.is_alive() for thread in started), "closing one model stopped the other's threads"
        assert new.score([image(9)]).rows[0].tolist() == row(9)
        with pytest.raises(ModelClosed):
            old.score([image(1)])
    finally:
        gate.set()
        new.close()
    assert {(is_new, v) for is_new, v in results} == {(v % 2 == 0, v) for v in range(1, 9)}
    for (_, v), got in results.items():
        assert got.tolist() == row(v)
    # A pass takes the run of one model's requests at the front of the queue, never the other's.
    assert [size for size, _, _ in old_module.calls] == [1, 3]
    assert [size for size, _, _ in new_module.calls] == [2, 2, 1]
    assert not any(thread.is_alive() for thread in started)


def test_threads_stopped_with_their_last_model_start_again_for_the_next():
    threads = InferenceThreads(workers=1)
    first = Model(Recorder(), decode_number, (4, 4), threads, warm_up_rounds=1)
    first.wait_ready(10)
    first.close()
    assert not threads.threads
    second = Model(Recorder(), decode_number, (4, 4), threads, warm_up_rounds=1)
    try:
        second.wait_ready(10)
        assert second.score([image(3)]).rows[0].tolist() == row(3)
    finally:
        second.close()


def test_thread_settings_belong_to_the_threads_not_to_a_model_that_shares_them():
    with pytest.raises(TypeError, match="micro_batch"):
        Model(Recorder(), decode_number, (4, 4), InferenceThreads(), micro_batch=4)


def test_no_solo_thread_when_it_would_not_have_more_threads():
    model = model_with(Recorder(), workers=2, torch_threads=2, solo_threads=2)
    try:
        assert model.workers == 2 and model.solo_threads == 0
    finally:
        model.close()


def test_uploads_are_decoded_on_the_inference_thread_and_fail_alone():
    module = Recorder(delay=0.05)
    decoded_on = []

    def preprocess(data):
        decoded_on.append(threading.current_thread().name)
        return decode_number(data)

    model = Model(module, preprocess, (4, 4), workers=1, torch_threads=1, micro_batch=8)
    scored = {}
    start = threading.Barrier(6)

    def one(v):
        start.wait()
        scored[v] = model.score([b"bad" if v == 3 else str(v).encode()])

    try:
        model.wait_ready(10)
        run_concurrently(one, [(v,) for v in range(1, 7)])
    finally:
        model.close()
    assert isinstance(scored[3].rejected, UndecodableImage)
    for v in (1, 2, 4, 5, 6):
        assert scored[v].rejected is None and scored[v].rows[0].tolist() == row(v)
    assert set(decoded_on) == {"whatcar-inference-0"}
    assert sum(size for size, _, _ in module.calls) == 5, "the rejected upload reached the model"
    assert max(size for size, _, _ in module.calls) > 1


def test_one_request_may_mix_rejected_and_scored_images_or_fail_whole():
    module = Recorder()
    model = model_with(module, workers=1, micro_batch=4)
    try:
        mixed = model.score([b"1", b"bad", image(2)])
        whole = model.score([b"1", b"bad", image(2)], all_or_nothing=True)
    finally:
        model.close()
    assert mixed.rows[0].tolist() == row(1) and mixed.rows[2].tolist() == row(2)
    assert isinstance(mixed.rows[1], UndecodableImage) and mixed.rejected is mixed.rows[1]
    assert isinstance(whole.rejected, UndecodableImage)
    assert [size for size, _, _ in module.calls] == [2], "an all-or-nothing request that failed reached the model"
