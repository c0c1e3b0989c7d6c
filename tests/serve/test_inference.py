"""The inference threads: batching callers together must never mix up whose row is whose."""

import threading
import time

import pytest
import torch

from serve.inference import Model, ModelClosed


class Recorder:
    """Stands in for the TorchScript module: row i is [mean of image i, -mean], and every call is
    recorded with its batch size, thread and torch thread count."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None):
        self.delay = delay
        self.fail_on = fail_on
        self.calls: list[tuple[int, str, int]] = []
        self.active = 0
        self.most_active = 0
        self.intervals: list[tuple[float, float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.calls.append((batch.shape[0], threading.current_thread().name, torch.get_num_threads()))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        started = time.monotonic()
        try:
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
    return torch.full((1, 3, 4, 4), value, dtype=torch.uint8)


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
            results[v] = model(image(v))
        except Exception as exc:  # noqa: BLE001
            errors[v] = exc

    run_concurrently(one, [(v,) for v in values])
    return {"results": results, "errors": errors}


def test_concurrent_callers_get_their_own_rows_from_shared_batches():
    module = Recorder(delay=0.05)
    model = Model(module, workers=1, max_batch=8)
    try:
        out = call_all(model, list(range(1, 13)))
    finally:
        model.close()
    assert not out["errors"]
    for v, row in out["results"].items():
        assert row.shape == (1, 2) and row.tolist() == [[float(v), -float(v)]]
    sizes = [size for size, _, _ in module.calls]
    assert sum(sizes) == 12
    assert max(sizes) > 1, "callers that waited together were not batched"
    assert max(sizes) <= 8


def test_a_lone_request_is_not_held_back_for_a_batch():
    module = Recorder()
    model = Model(module, workers=1, max_batch=8)
    try:
        for v in (3, 4, 5):
            assert model(image(v)).tolist() == [[float(v), -float(v)]]
    finally:
        model.close()
    assert [size for size, _, _ in module.calls] == [1, 1, 1]


def test_a_multi_image_job_keeps_its_order_and_is_never_split():
    module = Recorder()
    model = Model(module, workers=1, max_batch=2)
    batch = torch.cat([image(v) for v in (9, 1, 7, 3, 5)])
    try:
        rows = model(batch)
    finally:
        model.close()
    assert rows[:, 0].tolist() == [9.0, 1.0, 7.0, 3.0, 5.0]
    assert [size for size, _, _ in module.calls] == [5]


def test_workers_share_the_queue_and_set_their_torch_threads():
    module = Recorder(delay=0.05)
    model = Model(module, workers=2, torch_threads=1, max_batch=4)
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
    model = Model(module, workers=1, max_batch=8)
    try:
        out = call_all(model, [1, 2, 3, 4])
        assert 2 in out["errors"] and isinstance(out["errors"][2], RuntimeError)
        # Whoever shared a batch with the bad image failed with it; nobody got someone else's row.
        for v, row in out["results"].items():
            assert row.tolist() == [[float(v), -float(v)]]
        assert model(image(6)).tolist() == [[6.0, -6.0]]
    finally:
        model.close()


def test_batch_wait_holds_a_short_batch_open():
    module = Recorder()
    model = Model(module, workers=1, max_batch=4, batch_wait=0.3)
    results = {}

    def one(v, delay):
        time.sleep(delay)
        results[v] = model(image(v))

    try:
        run_concurrently(one, [(1, 0.0), (2, 0.05)], timeout=5)
    finally:
        model.close()
    assert [size for size, _, _ in module.calls] == [2]
    assert results[2].tolist() == [[2.0, -2.0]]


def test_warm_up_runs_on_every_inference_thread_at_each_batch_size():
    module = Recorder()
    model = Model(module, workers=2, torch_threads=1, max_batch=4)
    try:
        model.warm_up(4, 4, rounds=1)
    finally:
        model.close()
    names = {name for _, name, _ in module.calls}
    assert len(names) == 2 and all(name.startswith("whatcar-inference") for name in names)
    for name in names:
        assert sorted(size for size, who, _ in module.calls if who == name) == [1, 2, 4]


def test_closed_model_refuses_new_work():
    model = Model(Recorder(), workers=1)
    model.close()
    with pytest.raises(ModelClosed):
        model(image(1))


def test_photos_scored_together_get_the_answers_they_get_alone(scorer):
    """The real model through the app's Scorer: shared batches change nothing a client sees."""
    from serve.scoring import Scorer
    from tests.conftest import car_photos

    photos = car_photos()[::3]
    alone = {}
    for path in photos:
        with torch.inference_mode():
            alone[path] = scorer.artifact.module(scorer.preprocess(path.read_bytes()).unsqueeze(0))[0]
    sizes = []

    def module(batch):
        sizes.append(batch.shape[0])
        return scorer.artifact.module(batch)

    model = Model(module, workers=1, torch_threads=1, max_batch=4)
    batched = Scorer(scorer.artifact, model, scorer.max_image_pixels)
    answers = {}
    start = threading.Barrier(len(photos))

    def one(path):
        start.wait()
        answers[path] = batched.score(path.read_bytes(), k=len(scorer.artifact.labels))

    try:
        run_concurrently(one, [(p,) for p in photos], timeout=60)
    finally:
        model.close()
    assert len(answers) == len(photos)
    assert max(sizes) > 1 and sum(sizes) == len(photos)
    for path, answer in answers.items():
        expected = alone[path]
        labels = scorer.artifact.labels
        assert answer["predictions"][0]["label"] == labels[int(expected.argmax())]
        for p in answer["predictions"]:
            assert abs(p["probability"] - float(expected[labels.index(p["label"])])) < 1e-4


def test_batching_settings_come_from_flags_and_environment():
    from serve.config import ConfigError, load_config
    from tests.conftest import ARTIFACTS

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
    model = Model(module, workers=2, torch_threads=1, max_batch=2, solo_threads=2)
    try:
        for v in (1, 2, 3):
            assert model(image(v)).tolist() == [[float(v), -float(v)]]
    finally:
        model.close()
    assert [(size, name, threads) for size, name, threads in module.calls] == [(1, SOLO, 2)] * 3


def test_concurrent_requests_share_the_cores_and_never_overlap_a_solo_pass():
    module = Recorder(delay=0.03)
    model = Model(module, workers=2, torch_threads=1, max_batch=2, solo_threads=2)
    try:
        out = call_all(model, list(range(1, 17)))
    finally:
        model.close()
    assert not out["errors"]
    for v, row in out["results"].items():
        assert row.tolist() == [[float(v), -float(v)]]
    shared = [(size, threads) for size, name, threads in module.calls if name != SOLO]
    assert shared and {threads for _, threads in shared} == {1}
    assert module.most_active == 2, "the shared threads did not run side by side"
    for start, end, name in module.intervals:
        if name == SOLO:
            others = [(s, e) for s, e, n in module.intervals if (s, e, n) != (start, end, name)]
            assert all(e <= start or s >= end for s, e in others), "a pass ran during a solo pass"


def test_solo_thread_is_warmed_up_and_stops_on_close():
    module = Recorder()
    model = Model(module, workers=2, torch_threads=1, max_batch=2, solo_threads=2)
    model.warm_up(4, 4, rounds=1)
    model.close(timeout=5)
    assert (1, SOLO, 2) in module.calls
    assert not any(thread.is_alive() for thread in model._threads)


def test_no_solo_thread_when_it_would_not_have_more_threads():
    model = Model(Recorder(), workers=2, torch_threads=2, solo_threads=2)
    try:
        assert model.workers == 2 and model.solo_threads == 0
    finally:
        model.close()


def test_uploads_are_prepared_on_the_inference_thread_and_fail_alone():
    module = Recorder(delay=0.05)
    model = Model(module, workers=1, torch_threads=1, max_batch=8)
    prepared_on = []

    def prepare(v):
        def make():
            prepared_on.append(threading.current_thread().name)
            if v == 3:
                raise ValueError("undecodable upload")
            return image(v)
        return make

    results, errors = {}, {}
    start = threading.Barrier(6)

    def one(v):
        start.wait()
        try:
            results[v] = model.run(prepare(v))
        except ValueError as exc:
            errors[v] = exc

    try:
        run_concurrently(one, [(v,) for v in range(1, 7)])
    finally:
        model.close()
    assert set(errors) == {3} and str(errors[3]) == "undecodable upload"
    for v, row in results.items():
        assert row.tolist() == [[float(v), -float(v)]]
    assert set(prepared_on) == {"whatcar-inference-0"}
    assert sum(size for size, _, _ in module.calls) == 5, "the failed upload reached the model"
    assert max(size for size, _, _ in module.calls) > 1
