"""Training checkpoints: a run stopped after any epoch and started again ends with the weights an
uninterrupted run has; a checkpoint of another run, or a bad data folder, stops training at once."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from learners.learner import load
from tests.support.paths import CARS, ROOT
from train import checkpoint

# Random weights and tiny sizes keep each run to seconds; one head epoch, then one unfrozen epoch at
# the early size and one at the final size, so a stop can fall in each phase and across the switch.
RECIPE = ["--size", "48", "--early-size", "32", "--final-epochs", "1", "--epochs", "2", "--freeze-epochs", "1",
          "--batch-size", "8", "--no-pretrained", "--quiet"]


def train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", str(data), "--out", str(out), *RECIPE, *extra],
                          cwd=ROOT, capture_output=True, text=True)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load(out / "export.pkl").model.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run = train(CARS, out)
    assert run.returncode == 0, run.stderr
    return out


@pytest.mark.parametrize("stop_after", [1, 2])
def test_a_stopped_run_resumes_to_the_same_weights(uninterrupted, tmp_path, stop_after):
    first = train(CARS, tmp_path, "--stop-after", str(stop_after))
    assert first.returncode == 0, first.stderr
    assert f"stopped after epoch {stop_after} of 3" in first.stderr
    assert not (tmp_path / "export.pkl").exists() and (tmp_path / checkpoint.FILE).is_file()
    second = train(CARS, tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"going on from the checkpoint after epoch {stop_after} of 3" in second.stderr
    # Only the epochs after the checkpoint ran the second time.
    ran = [line for line in second.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(" (")[0] for line in ran] == [f"epoch {n} of 3" for n in range(stop_after + 1, 4)]
    expected, got = weights(uninterrupted), weights(tmp_path)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_the_run_says_how_long_it_will_take_before_the_first_epoch(uninterrupted, tmp_path):
    run = train(CARS, tmp_path, "--stop-after", "1")
    lines = run.stderr.splitlines()
    estimate = next(i for i, line in enumerate(lines) if line.startswith("training: expected to take about"))
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1 of 3"))
    assert estimate < first_epoch
    chosen = [i for i, line in enumerate(lines) if line.startswith("precision: ")]
    assert len(chosen) == 1 and chosen[0] < first_epoch and "channels-last" in lines[chosen[0]]
    assert "about" in lines[first_epoch] and "left" in lines[first_epoch]
    # --quiet: the epoch lines in words, not fastai's raw list of values as well.
    assert not [line for line in run.stdout.splitlines() if line.startswith("[")], run.stdout


def test_a_checkpoint_of_other_arguments_is_refused(tmp_path):
    assert train(CARS, tmp_path, "--stop-after", "1").returncode == 0
    other = train(CARS, tmp_path, "--lr", "0.001")
    assert other.returncode != 0
    assert "is from another run" in other.stderr and "--lr 0.003 (now 0.001)" in other.stderr
    assert not (tmp_path / "export.pkl").exists()
    fresh = train(CARS, tmp_path, "--lr", "0.001", "--fresh", "--stop-after", "1")
    assert fresh.returncode == 0, fresh.stderr
    assert "going on" not in fresh.stderr


def test_a_forced_precision_other_than_the_checkpoints_is_refused_and_auto_keeps_it(tmp_path):
    assert train(CARS, tmp_path, "--precision", "fp32", "--stop-after", "1").returncode == 0
    other = train(CARS, tmp_path, "--precision", "bf16")
    assert other.returncode != 0
    assert "--precision 'fp32' (now 'bf16')" in other.stderr
    kept = train(CARS, tmp_path, "--stop-after", "2")
    assert kept.returncode == 0, kept.stderr
    assert "auto keeps the fp32 of the checkpoint" in kept.stderr and "going on" in kept.stderr


def test_a_checkpoint_of_another_data_folder_is_refused(tmp_path):
    data = copy_of_cars(tmp_path)
    out = tmp_path / "out"
    assert train(data, out, "--stop-after", "1").returncode == 0
    victim = sorted(data.glob("*/*.jpg"))[0]
    victim.unlink()
    run = train(data, out)
    assert run.returncode != 0
    assert "the photos in the data folder" in run.stderr


def copy_of_cars(tmp_path: Path) -> Path:
    data = tmp_path / "cars"
    shutil.copytree(CARS, data)
    return data


def refusal(data: Path, out: Path) -> str:
    """The one line a run refused before its first epoch ends with."""
    run = train(data, out)
    assert run.returncode != 0
    assert "epoch 1" not in run.stderr
    return run.stderr.strip().splitlines()[-1]


def test_a_class_with_too_few_photos_stops_training_before_any_epoch(tmp_path):
    data = copy_of_cars(tmp_path)
    thin = sorted(data.iterdir())[0]
    for photo in sorted(thin.glob("*.jpg"))[4:]:
        photo.unlink()
    last = refusal(data, tmp_path / "out")
    assert str(thin) in last and "has 4 photos" in last


def test_an_unreadable_photo_stops_training_before_any_epoch(tmp_path):
    data = copy_of_cars(tmp_path)
    broken = sorted(data.glob("*/*.jpg"))[3]
    broken.write_bytes(broken.read_bytes()[:300])
    last = refusal(data, tmp_path / "out")
    assert str(broken) in last and "cannot be read" in last


def test_symlinked_class_folders_train_and_record_paths_inside_the_data_folder(tmp_path):
    data = tmp_path / "linked"
    data.mkdir()
    for folder in sorted(CARS.iterdir()):
        if folder.is_dir():
            (data / folder.name).symlink_to(folder, target_is_directory=True)
    out = tmp_path / "out"
    run = train(data, out, "--epochs", "0", "--final-epochs", "1")
    assert run.returncode == 0, run.stderr
    info = json.loads((out / "export.pkl.json").read_text())
    assert info["valid_files"] and all((data / rel).is_file() for rel in info["valid_files"])
    assert all(not rel.startswith("..") for rel in info["valid_files"])


def test_positions_say_where_each_phase_goes_on():
    head_done = checkpoint.Position(checkpoint.HEAD, 1)
    assert head_done.start_of(checkpoint.HEAD, 2) is None and head_done.start_of(checkpoint.BODY, 3) == 0
    mid_head = checkpoint.Position(checkpoint.HEAD, 0)
    assert mid_head.start_of(checkpoint.HEAD, 2) == 1
    mid_body = checkpoint.Position(checkpoint.BODY, 1)
    assert mid_body.start_of(checkpoint.HEAD, 2) is None and mid_body.start_of(checkpoint.BODY, 3) == 2
    assert checkpoint.Position(checkpoint.BODY, 2).start_of(checkpoint.BODY, 3) is None


def test_a_torn_checkpoint_is_refused_with_one_line(tmp_path):
    (tmp_path / checkpoint.FILE).write_bytes(b"not a checkpoint")
    run = train(CARS, tmp_path)
    assert run.returncode != 0
    assert "cannot be read" in run.stderr.strip().splitlines()[-1]


def test_an_image_is_needed_per_class_folder_even_when_empty(tmp_path):
    data = copy_of_cars(tmp_path)
    (data / "Empty Class 2012").mkdir()
    Image.new("RGB", (8, 8)).save(data / "stray.txt", format="PNG")  # not an image name: ignored
    assert "Empty Class 2012 has 0 photos" in refusal(data, tmp_path / "out")


def test_a_checkpoint_write_cut_short_keeps_the_one_before(tmp_path, monkeypatch):
    class Learner:
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

    saved = checkpoint.Checkpoints(tmp_path, {"lr": 0.1}, "data")
    saved.write(Learner, checkpoint.Position(checkpoint.HEAD, 0), [])

    def power_cut(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("os.replace", power_cut)
    with pytest.raises(OSError):
        saved.write(Learner, checkpoint.Position(checkpoint.HEAD, 1), [])
    monkeypatch.undo()
    assert saved.read().position == checkpoint.Position(checkpoint.HEAD, 0)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILE]


def test_a_checkpoint_of_a_run_from_another_learner_is_refused(tmp_path):
    """A run that goes on from an exported learner (--resume) continues its checkpoint only while
    that learner holds the same weights: `make train` writes its first run's learner to the same
    path every time, so the path alone would not tell."""
    base = tmp_path / "base"
    assert train(CARS, base).returncode == 0
    finish = ["--resume", str(base / "export.pkl"), "--epochs", "2"]
    assert train(CARS, tmp_path / "out", *finish, "--stop-after", "1").returncode == 0
    assert train(CARS, base, "--seed", "7", "--fresh").returncode == 0  # the first run, trained again
    run = train(CARS, tmp_path / "out", *finish)
    assert run.returncode != 0
    assert "other weights in the learner --resume names" in run.stderr
    assert not (tmp_path / "out" / "export.pkl").exists()


def test_a_missing_learner_to_go_on_from_is_one_line(tmp_path):
    run = train(CARS, tmp_path, "--resume", str(tmp_path / "nowhere.pkl"))
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == f"make train: --resume {tmp_path / 'nowhere.pkl'} is not a file"


def test_the_weights_digest_follows_the_weights_not_their_memory_layout():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before = checkpoint.weights_digest(model)
    assert checkpoint.weights_digest(model.to(memory_format=torch.channels_last)) == before
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-3
    assert checkpoint.weights_digest(model) != before


def test_a_finished_run_is_skipped_when_run_again_with_the_same_inputs(uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    before = (out / "export.pkl").read_bytes()
    again = train(CARS, out)
    assert again.returncode == 0, again.stderr
    assert "is this run's already" in again.stderr and "skipped" in again.stderr
    assert not [line for line in again.stderr.splitlines() if line.startswith("epoch ")]
    assert (out / "export.pkl").read_bytes() == before


def test_runs_differing_in_run_seed_hold_out_the_same_photos_but_learn_other_weights(uninterrupted, tmp_path):
    same = train(CARS, tmp_path / "same", "--run-seed", "42")  # --seed's own: the default run
    other = train(CARS, tmp_path / "other", "--run-seed", "7")
    assert same.returncode == 0 and other.returncode == 0, same.stderr + other.stderr
    sidecar = {name: json.loads((tmp_path / name / "export.pkl.json").read_text()) for name in ("same", "other")}
    default = json.loads((uninterrupted / "export.pkl.json").read_text())
    assert sidecar["same"]["valid_files"] == sidecar["other"]["valid_files"] == default["valid_files"]
    expected, got_same, got_other = weights(uninterrupted), weights(tmp_path / "same"), weights(tmp_path / "other")
    assert all(torch.equal(expected[name], got_same[name]) for name in expected)
    assert not all(torch.equal(expected[name], got_other[name]) for name in expected)


def finished_inputs(**recipe) -> dict:
    return {"recipe": {"lr": 0.003, "precision": "bf16", **recipe}, "data": "abc", "start": None, "teachers": ["t1"]}


@pytest.mark.parametrize("now, any_precision, skipped", [
    (finished_inputs(), False, True),
    (finished_inputs(lr=0.001), False, False),
    (finished_inputs(precision="fp32"), False, False),
    (finished_inputs(precision="fp32"), True, True),
    ({**finished_inputs(), "data": "abd"}, True, False),
    ({**finished_inputs(), "teachers": ["t2"]}, True, False),
    ({**finished_inputs(), "start": "s"}, True, False),
])
def test_a_run_is_finished_only_if_every_input_is_the_same(now, any_precision, skipped):
    sidecar = {"inputs": finished_inputs()}
    assert checkpoint.finished_as(sidecar, now, any_precision) is skipped


def test_a_learner_without_recorded_inputs_is_trained_again():
    assert not checkpoint.finished_as({"training": {"lr": 0.003}}, finished_inputs(), any_precision=True)
