"""`python -m serve.classify`: a folder of photos scored into CSV or JSON Lines, as the server scores
them, resumable, with one clear line for each way it cannot start."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from serve.classify import cli, output
from serve.classify.rows import Row
from tests.support.paths import ARTIFACTS, ROOT, car_photos
from tests.support.uploads import encode

PHOTOS = car_photos()[::4]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos in nested folders, plus files that cannot be scored."""
    folder = tmp_path_factory.mktemp("photos")
    for path in PHOTOS:
        target = folder / path.parent.name / path.name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, target)
    (folder / "notes.txt").write_text("not a photo\n")
    (folder / "broken.jpg").write_bytes(PHOTOS[0].read_bytes()[:300])
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / "deep" / "er" / "bomb.png").write_bytes(encode(Image.new("L", (9000, 9000)), "PNG"))
    return folder


def run(*argv: str) -> int:
    return cli.main([*argv, "--model-dir", str(ARTIFACTS), "--max-image-pixels", "50000000"])


def csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_every_file_gets_a_row_with_the_servers_answer_or_its_error(photos, tmp_path, client, capsys):
    out = tmp_path / "results.csv"
    assert run(str(photos), str(out), "--top-k", "3") == 0
    rows = {row["path"]: row for row in csv_rows(out)}
    assert len(rows) == len(PHOTOS) + 3
    assert rows["notes.txt"]["error"].startswith("unsupported_type:")
    assert rows["broken.jpg"]["error"].startswith("undecodable:")
    assert rows["deep/er/bomb.png"]["error"].startswith("too_many_pixels:")
    for path in PHOTOS:
        row = rows[f"{path.parent.name}/{path.name}"]
        expected = client.simulate_post("/predict", body=path.read_bytes(), params={"top_k": "3"},
                                        headers={"Content-Type": "image/jpeg"}).json
        assert [row[f"label_{i}"] for i in (1, 2, 3)] == [p["label"] for p in expected["predictions"]]
        assert [float(row[f"probability_{i}"]) for i in (1, 2, 3)] == \
            pytest.approx([p["probability"] for p in expected["predictions"]], abs=2e-6)
        assert (row["model"], row["version"], row["sha256"], row["error"]) == \
            (expected["model"]["name"], expected["model"]["version"], expected["model"]["sha256"], "")
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith(f"scored {len(PHOTOS)}, failed 3 in ") and "images/s" in summary


def test_json_lines_hold_the_same_answers(photos, tmp_path):
    as_csv, as_json = tmp_path / "a.csv", tmp_path / "a.jsonl"
    assert run(str(photos), str(as_csv)) == 0 and run(str(photos), str(as_json)) == 0
    from_csv = {row["path"]: row["label_1"] for row in csv_rows(as_csv)}
    lines = [json.loads(line) for line in as_json.read_text().splitlines()]
    from_json = {line["path"]: (line["predictions"][0]["label"] if line["predictions"] else "") for line in lines}
    assert from_json == from_csv
    assert all(len(line["predictions"]) == 5 for line in lines if line["error"] is None)


def test_a_rerun_skips_what_is_done_and_drops_a_row_cut_off_by_a_kill(photos, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert run(str(photos), str(out)) == 0
    lines = out.read_text().splitlines()
    # As if killed mid-write: the last two rows gone and half of the one before.
    out.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][: len(lines[-3]) // 2])
    capsys.readouterr()
    assert run(str(photos), str(out)) == 0
    assert f"skipped {len(lines) - 3} already done" in capsys.readouterr().err
    again = out.read_text().splitlines()
    assert sorted(again) == sorted(lines) and len(again) == len(set(again))


def test_rows_of_another_model_are_kept_and_rescored(photos, tmp_path):
    out = tmp_path / "results.jsonl"
    assert run(str(photos), str(out)) == 0
    older = [json.loads(line) for line in out.read_text().splitlines()]
    for line in older:
        line["model"]["sha256"] = "0" * 64
    out.write_text("".join(json.dumps(line) + "\n" for line in older))
    assert run(str(photos), str(out)) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 * len(older)


def test_an_unreadable_file_is_an_error_row(photos, tmp_path, monkeypatch):
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == PHOTOS[0].name and self.parent.name == PHOTOS[0].parent.name:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    out = tmp_path / "results.csv"
    assert run(str(photos), str(out)) == 0
    rows = {row["path"]: row for row in csv_rows(out)}
    assert rows[f"{PHOTOS[0].parent.name}/{PHOTOS[0].name}"]["error"] == "unreadable: Permission denied"


def test_ctrl_c_leaves_a_valid_file_that_a_rerun_completes(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        shutil.copyfile(PHOTOS[i % len(PHOTOS)], folder / f"{i:03d}.jpg")
    out = tmp_path / "results.csv"
    command = [sys.executable, "-m", "serve.classify", str(folder), str(out), "--model-dir", str(ARTIFACTS)]
    # Ctrl-C as a terminal delivers it, even when the tests run in a background job that ignores it.
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted: scored")
    first = csv_rows(out)
    assert 4 <= len(first) < 60 and out.read_text().endswith("\n")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = csv_rows(out)
    assert sorted(row["path"] for row in rows) == sorted(f"{i:03d}.jpg" for i in range(60))


def test_the_progress_bar_shows_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    shown, hidden = Terminal(), io.StringIO()
    for stream in (shown, hidden):
        progress = output.Progress(2, stream)
        progress.add(Row("a.jpg", [("X", 1.0)]))
        progress.add(Row("b.txt", error="unsupported_type: no"))
        assert progress.summary(0).startswith("scored 1, failed 1 in ")
    assert "2/2 files" in shown.getvalue() and "images/s" in shown.getvalue() and "left" in shown.getvalue()
    assert hidden.getvalue() == ""


@pytest.mark.parametrize("case, expected", [
    ("missing-input", "input folder .* does not exist"),
    ("empty-input", "holds no files"),
    ("unwritable-output", "cannot write"),
    ("unknown-format", "name it .csv or .jsonl"),
    ("broken-model", "cannot use model folder"),
    ("tampered-model", "sha256 is"),
])
def test_each_way_it_cannot_start_is_one_line_and_a_failure(photos, tmp_path, case, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    models = tmp_path / "models"
    if case == "tampered-model":
        shutil.copytree(ARTIFACTS, models, symlinks=True)
        (models / "1" / "labels.txt").write_text("tampered\n")
    else:
        models.mkdir()
    args = {
        "missing-input": [str(tmp_path / "nowhere"), str(tmp_path / "r.csv")],
        "empty-input": [str(empty), str(tmp_path / "r.csv")],
        "unwritable-output": [str(photos), str(blocker / "r.csv")],
        "unknown-format": [str(photos), str(tmp_path / "r.xlsx")],
        "broken-model": [str(photos), str(tmp_path / "r.csv"), "--model-dir", str(models)],
        "tampered-model": [str(photos), str(tmp_path / "r.csv"), "--model-dir", str(models)],
    }[case]
    if "--model-dir" not in args:
        args += ["--model-dir", str(ARTIFACTS)]
    done = subprocess.run([sys.executable, "-m", "serve.classify", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("whatcar classify: ")
    assert re.search(expected, lines[0]), lines[0]


def test_a_row_travels_as_json_and_comes_back_equal():
    """How a Ray actor hands its rows back: every field, the make and the ranked pairs included."""
    row = Row("a/b.jpg", [("Audi S4 Sedan 2012", 0.51), ("Audi S4 Sedan 2007", 0.3)], accepted=False,
              reason="an Audi; not sure which model", accepted_level="make", make=("Audi", 0.81))
    assert Row.from_json(row.to_json()) == row
    failed = Row("c.txt", error="unsupported_type: not an image")
    assert Row.from_json(failed.to_json()) == failed
