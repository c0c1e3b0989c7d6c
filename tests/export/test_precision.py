"""The training precision chosen from the CPU's flags, and the callback that applies it."""

import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch.utils.data import TensorDataset

from train import checkpoint, precision
from train.precision import BF16, FP32, choose_precision

EPYC = {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "amx_bf16", "amx_tile"}
AVX2_ONLY = {"fpu", "sse2", "avx", "avx2", "fma"}


def test_cpuinfo_flags_are_read_from_the_flags_line():
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512_bf16\n"
            "bugs\t\t: sysret_ss_attrs\n")
    assert precision.cpu_flags(text) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert precision.cpu_flags("processor\t: 0\n") == set()


@pytest.mark.parametrize("flags", [EPYC, SAPPHIRE_RAPIDS])
def test_auto_is_bf16_where_the_cpu_computes_it_natively(flags):
    choice = choose_precision(flags, "auto")
    assert choice.precision == BF16
    assert choice.memory_format == precision.CHANNELS_LAST
    assert "natively" in choice.reason


def test_auto_is_fp32_on_an_avx2_only_cpu():
    choice = choose_precision(AVX2_ONLY, "auto")
    assert choice.precision == FP32 and choice.memory_format == precision.CHANNELS_LAST
    assert "emulated" in choice.reason


def test_forcing_bf16_without_it_is_allowed_but_says_it_will_be_slow():
    choice = choose_precision(AVX2_ONLY, "bf16")
    assert choice.precision == BF16 and "slow" in choice.reason
    assert "slow" not in choose_precision(EPYC, "bf16").reason


def test_forcing_fp32_is_kept_on_a_bf16_cpu():
    assert choose_precision(EPYC, "fp32").precision == FP32


def test_auto_keeps_the_precision_of_the_checkpoint_it_continues():
    assert choose_precision(EPYC, "auto", continuing=FP32).precision == FP32
    moved = choose_precision(AVX2_ONLY, "auto", continuing=BF16)
    assert moved.precision == BF16 and "slow" in moved.reason
    # A forced flag is what the user asked for; the checkpoint then refuses it if it differs.
    assert choose_precision(EPYC, "bf16", continuing=FP32).precision == BF16


def test_an_unknown_request_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        choose_precision(EPYC, "fp16")


def test_a_checkpoint_from_before_the_flags_counts_as_fp32_and_one_seed(tmp_path):
    """Older checkpoints trained in fp32, with --seed for the training too, and have neither
    --precision nor --run-seed in their recipe."""
    (tmp_path / checkpoint.FILE).write_bytes(b"")
    assert checkpoint.stored_recipe(tmp_path) is None  # unreadable: Checkpoints.read reports it
    torch.save({"recipe": {"lr": 0.003}}, tmp_path / checkpoint.FILE)
    assert checkpoint.stored_recipe(tmp_path) == {"lr": 0.003, "precision": FP32, "run_seed": None}


class Seen(Callback):
    """What the model was given and what it computed, per batch."""

    order = 80  # after ChannelsLastAutocast

    def __init__(self):
        self.layouts, self.preds = [], []

    def after_pred(self):
        self.layouts.append(self.xb[0].is_contiguous(memory_format=torch.channels_last))
        self.preds.append(self.pred.dtype)


class Probe(torch.nn.Module):
    def __init__(self, log: list):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4, 2)
        self.log = log

    def forward(self, x):
        y = self.conv(x)
        self.log.append((y.dtype, self.conv.weight.dtype))
        return self.head(y.mean((2, 3)))


def tiny_learner(log: list) -> Learner:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 2, (8,), generator=g)
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x, y), bs=4)
    return Learner(dls, Probe(log), loss_func=torch.nn.CrossEntropyLoss())


@pytest.mark.parametrize("chosen, dtype", [(BF16, torch.bfloat16), (FP32, torch.float32)])
def test_the_callback_feeds_channels_last_batches_and_runs_the_forward_pass_in_the_chosen_precision(chosen, dtype):
    log: list = []
    learn = tiny_learner(log)
    seen = Seen()
    learn.fit(1, 1e-3, cbs=[precision.ChannelsLastAutocast(chosen), seen])
    assert seen.layouts and all(seen.layouts)
    assert {computed for computed, _ in log} == {dtype}
    # The weights stay fp32, and the loss is taken on fp32 logits.
    assert {weights for _, weights in log} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert set(seen.preds) == {torch.float32}


def test_without_the_callback_batches_arrive_contiguous():
    """What the callback is for: fastai hands the model NCHW batches."""
    learn = tiny_learner([])
    seen = Seen()
    learn.fit(1, 1e-3, cbs=[seen])
    assert seen.layouts and not any(seen.layouts)


def test_autocast_is_left_after_each_batch():
    log: list = []
    learn = tiny_learner(log)
    learn.fit(1, 1e-3, cbs=[precision.ChannelsLastAutocast(BF16)])
    assert not torch.is_autocast_enabled("cpu")
    # A forward pass outside the fit is fp32 again.
    learn.model(torch.rand(1, 3, 16, 16))
    assert log[-1][0] == torch.float32
