"""The batch job on a real Ray cluster: a head node and a worker node on this machine, started and
stopped here. Runs from the Ray virtualenv (make test-ray); the one-machine command it is held to
runs from the serve virtualenv, as `make classify` runs it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.support.paths import ARTIFACTS, ROOT, SERVE_PYTHON, car_photos
from tests.support.ray_cluster import NODE_IP, LocalCluster, free_port

RAY = Path(sys.executable).parent / "ray"
FULL_DISK = {"RAY_local_fs_capacity_threshold": "0"}


@pytest.fixture(scope="module")
def cluster():
    # Every disk counts as full (a spill threshold of 0), as on a nearly full CI machine: the jobs
    # must run from the object stores alone (tests/support/ray_cluster.py).
    cluster = LocalCluster(RAY, env=FULL_DISK).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        assert cluster.leftovers() == [], "a Ray process outlived the cluster"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for path in car_photos():
        target = folder / path.parent.name / path.name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, target)
    (folder / "bad").mkdir()
    (folder / "bad" / "notes.txt").write_text("not a photo\n")
    (folder / "bad" / "cut.jpg").write_bytes(car_photos()[0].read_bytes()[:400])
    (folder / "bad" / "empty.jpg").write_bytes(b"")
    Image.new("L", (9000, 9000)).save(folder / "bad" / "bomb.png")
    return folder


def classify(python: Path, *args: str, cwd: Path = ROOT, timeout: float = 600,
             model_dir: Path = ARTIFACTS) -> subprocess.CompletedProcess:
    # The driver runs outside the repository with the code on PYTHONPATH, so the workers can only
    # import whatcar from what the job ships them.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([str(python), "-m", "serve.classify", *args, "--model-dir", str(model_dir),
                           "--max-image-pixels", "50000000"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def lines(path: Path) -> dict[str, dict]:
    return {row["path"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_the_cluster_job_gives_exactly_the_rows_of_the_one_machine_command(cluster, photos, tmp_path):
    assert SERVE_PYTHON.exists(), f"{SERVE_PYTHON} missing; run through `make test`"
    local = classify(SERVE_PYTHON, str(photos), str(tmp_path / "local.jsonl"))
    assert local.returncode == 0, local.stderr
    remote = classify(Path(sys.executable), str(photos), str(tmp_path / "ray.jsonl"), "--ray", cluster.address,
                      "--actors", "2", "--batch-size", "4", cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert remote.stderr.strip().splitlines()[-1].startswith("scored 24, failed 4 in ")
    expected, got = lines(tmp_path / "local.jsonl"), lines(tmp_path / "ray.jsonl")
    assert got == expected  # every label, every probability to six decimals, every error
    assert {Path(p).name: row["error"].split(":")[0] for p, row in got.items() if row["error"]} == \
        {"notes.txt": "unsupported_type", "cut.jpg": "undecodable", "empty.jpg": "empty", "bomb.png": "too_many_pixels"}


def test_a_cluster_run_resumes_like_a_local_one(cluster, photos, tmp_path):
    out = tmp_path / "results.csv"
    first = classify(SERVE_PYTHON, str(photos), str(out))
    assert first.returncode == 0, first.stderr
    kept = out.read_text().splitlines()
    out.write_text("\n".join(kept[:11]) + "\n" + kept[11][:20])  # ten rows done, one cut off by a kill
    again = classify(Path(sys.executable), str(photos), str(out), "--ray", cluster.address, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped 10 already done" in again.stderr.strip().splitlines()[-1]
    assert sorted(out.read_text().splitlines()) == sorted(kept)


def test_a_cluster_that_cannot_hold_the_model_is_one_line(photos, tmp_path):
    # A store smaller than the model version, on a node whose disk counts as full. Ray's store is
    # at least about 75 MB and the default version, its weights stored once, is 29 MB: a file
    # beside it (shipped with every file of the version, though the loader reads only those the
    # manifest lists) makes the version larger than the store.
    models = tmp_path / "models"
    shutil.copytree(ARTIFACTS / "1", models / "1")
    (models / "current").symlink_to("1")
    with open(models / "1" / "padding.bin", "wb") as pad:
        pad.truncate(100 * 2**20)
    small = LocalCluster(RAY, workers=0, object_store_bytes=80 * 2**20, env=FULL_DISK).start()
    try:
        done = classify(Path(sys.executable), str(photos), str(tmp_path / "r.csv"), "--ray", small.address,
                        cwd=tmp_path, timeout=300, model_dir=models)
    finally:
        small.stop()
    assert small.leftovers() == []
    lines_ = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines_) == 1, done.stderr[-3000:]
    assert lines_[0].startswith(f"whatcar classify: the Ray cluster at {small.address} cannot hold the model "
                                "version ("), lines_[0]
    assert "OutOfDiskError" in lines_[0]


def test_a_refused_address_is_one_line_at_once(photos, tmp_path):
    started = time.monotonic()
    done = classify(Path(sys.executable), str(photos), str(tmp_path / "r.csv"), "--ray", f"{NODE_IP}:{free_port()}",
                    cwd=tmp_path, timeout=120)
    lines_ = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines_) == 1, done.stderr
    assert lines_[0].startswith("whatcar classify: cannot reach the Ray cluster at")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "r.csv").exists() or (tmp_path / "r.csv").read_text().count("\n") <= 1


def test_an_address_that_is_not_ray_is_bounded_by_the_connect_timeout(photos, tmp_path):
    listener = socket.socket()
    listener.bind((NODE_IP, 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # accept, never answer
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        done = classify(Path(sys.executable), str(photos), str(tmp_path / "r.csv"), "--ray",
                        f"{NODE_IP}:{listener.getsockname()[1]}", "--connect-timeout", "5", cwd=tmp_path, timeout=120)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert done.returncode == 1, done.stderr
    assert "did not answer as a Ray cluster within 5 s" in done.stderr.strip().splitlines()[-1]
