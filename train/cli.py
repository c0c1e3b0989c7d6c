"""Fine-tune a fastai vision learner on a folder of class-named subfolders.

    python -m train DATA [--out models] [--size 224] [--epochs 28] ...

Writes `<out>/export.pkl` with `learn.export()`; `python -m export` turns it into an artifact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from learners import learner as learner_io

from . import backbones, checkpoint, datafolder, distill, precision, progress

# The first run of the committed 164-class model: 2 head epochs, then 28 unfrozen ones in one
# one-cycle schedule, every one at 224 px; `make train` then goes on from it for 4 epochs at
# 256 px, the size served. Ending at 352 px instead, and averaging the weights (EMA), both scored
# lower: docs/training.md has the runs and their figures.
DEFAULTS = dict(size=224, epochs=28, freeze_epochs=2, lr=3e-3, batch_size=32, valid_pct=0.2, seed=42, frozen_blocks=3,
                early_size=224, final_epochs=3, mixup=0.0, cutmix=0.0, drop_path=0.0, ema=0.0,
                make_loss=0.0)
# Only with --teacher, so not in DEFAULTS, whose options are the recipe's and off when unset.
DISTILL_DEFAULTS = dict(distill=0.5, temperature=2.0)
ARCHS = ("lite0", "resnet18", "resnet34", "resnet50")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="folder with one subfolder of images per class")
    p.add_argument("--out", type=Path, default=Path("models"), help="where export.pkl is written (default: models)")
    p.add_argument("--arch", choices=ARCHS, default="lite0",
                   help="lite0: EfficientNet-Lite0 with packaged ImageNet weights (offline); "
                        "resnet*: torchvision, whose pretrained weights are downloaded (default: lite0)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="start from random weights (works offline for any arch)")
    p.add_argument("--size", type=int, default=DEFAULTS["size"],
                   help="square input size in pixels (default: %(default)s)")
    p.add_argument("--resize", choices=("squish", "crop", "pad"), default="squish",
                   help="how images are brought to --size (default: %(default)s; squish keeps the whole car in view)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                   help="epochs after unfreezing (default: %(default)s)")
    p.add_argument("--final-epochs", type=int, default=DEFAULTS["final_epochs"],
                   help="progressive resizing: only the last FINAL_EPOCHS of --epochs run at --size, the size "
                        "served; the head-only epochs and the unfrozen ones before run at --early-size, which costs "
                        "a fraction of a --size epoch. One one-cycle schedule spans both sizes "
                        "(default: %(default)s; unset: every epoch at --size)")
    p.add_argument("--early-size", type=int, default=DEFAULTS["early_size"],
                   help="input size before the last --final-epochs (default: %(default)s)")
    p.add_argument("--freeze-epochs", type=int, default=DEFAULTS["freeze_epochs"],
                   help="epochs training only the head first (default: %(default)s)")
    p.add_argument("--frozen-blocks", type=int, default=DEFAULTS["frozen_blocks"],
                   help="lite0: keep the stem and this many early blocks frozen throughout; their generic "
                        "features need no tuning and skipping their backward pass makes CPU training ~2x faster "
                        "(default: %(default)s)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="default: %(default)s")
    p.add_argument("--valid-pct", type=float, default=DEFAULTS["valid_pct"],
                   help="validation share (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="split and training seed (default: %(default)s)")
    p.add_argument("--run-seed", type=int, default=None,
                   help="another seed for the training alone (the head's first weights, the order of the photos "
                        "and their augmentation), the split staying --seed's: runs that differ only in it are "
                        "teachers that agree on which photos are held out (default: --seed)")
    p.add_argument("--resume", type=Path, default=None,
                   help="continue training this exported learner (from an earlier run on the same DATA, "
                        "split and size) instead of starting from ImageNet weights; skips the head-only epochs")
    p.add_argument("--no-augment", action="store_true", help="train without flips, affine and lighting augmentation")
    mix = p.add_mutually_exclusive_group()
    mix.add_argument("--mixup", type=float, default=DEFAULTS["mixup"], metavar="ALPHA",
                     help="blend pairs of training images and their labels, mixing weights from Beta(ALPHA, ALPHA); "
                          "0 turns it off (default: %(default)s)")
    mix.add_argument("--cutmix", type=float, default=DEFAULTS["cutmix"], metavar="ALPHA",
                     help="paste a patch of one training image into another, labels weighted by area, patch area "
                          "from Beta(ALPHA, ALPHA); 0 turns it off (default: %(default)s)")
    p.add_argument("--drop-path", type=float, default=DEFAULTS["drop_path"],
                   help="lite0: stochastic depth, the chance of skipping a residual block in a training step "
                        "(grows with depth up to this); no effect at inference (default: %(default)s)")
    p.add_argument("--ema", type=float, default=DEFAULTS["ema"], metavar="DECAY",
                   help="keep an exponential moving average of the weights over the steps at --size and save it "
                        "instead of the last weights; 0 turns it off (default: %(default)s)")
    p.add_argument("--make-loss", type=float, default=DEFAULTS["make_loss"], metavar="WEIGHT",
                   help="add WEIGHT times a loss on the make's probability (the sum of its models'), so that a "
                        "wrong model of the right make costs less than a wrong make; 0 turns it off "
                        "(default: %(default)s)")
    p.add_argument("--teacher", type=Path, action="append", default=None, metavar="PATH",
                   help="distil from this teacher: an exported learner (export.pkl) or an artifact version folder "
                        "(model.pt, labels.txt, manifest.json), trained on the same classes; repeat it for an "
                        "ensemble, whose softened probabilities are averaged. Their outputs are computed once "
                        "into OUT/teacher-cache.pt")
    p.add_argument("--distill", type=float, default=DISTILL_DEFAULTS["distill"], metavar="WEIGHT",
                   help="with --teacher: the share of the distillation loss, the label loss getting the rest "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=DISTILL_DEFAULTS["temperature"], metavar="T",
                   help="with --teacher: the softmax temperature of both the teachers' and the student's "
                        "probabilities in the distillation loss (default: %(default)s)")
    p.add_argument("--precision", choices=precision.REQUESTS, default=precision.AUTO,
                   help="auto: bf16 autocast where the CPU computes bf16 natively (avx512_bf16 or amx_bf16), "
                        "fp32 elsewhere, or what the checkpoint being continued used; the weights stay fp32 "
                        "(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the per-epoch lines with the time left stay)")
    p.add_argument("--fresh", action="store_true",
                   help="start over even if OUT holds a checkpoint of this or another run (it is replaced)")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop once this many epochs of the run have finished (head-only epochs included); the "
                        "checkpoint is saved, and the same command without it goes on from there")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        p.error(f"DATA {args.data} is not a folder")
    if args.size < 32 or args.epochs < 0 or args.freeze_epochs < 0 or not 0 < args.valid_pct < 1:
        p.error("need --size >= 32, --epochs >= 0, --freeze-epochs >= 0 and 0 < --valid-pct < 1")
    if args.final_epochs is not None and (args.final_epochs < 1 or args.early_size < 32):
        p.error("need --final-epochs >= 1 (the served size must be trained on) and --early-size >= 32")
    if args.stop_after is not None and args.stop_after < 1:
        p.error("need --stop-after >= 1")
    if args.mixup < 0 or args.cutmix < 0 or not 0 <= args.drop_path < 1 or not 0 <= args.ema < 1:
        p.error("need --mixup >= 0, --cutmix >= 0, 0 <= --drop-path < 1 and 0 <= --ema < 1")
    args.teacher = args.teacher or []
    if args.teacher and (not 0 <= args.distill <= 1 or args.temperature <= 0 or args.mixup or args.cutmix):
        p.error("with --teacher, need 0 <= --distill <= 1, --temperature > 0, and no --mixup or --cutmix (the "
                "cached targets are for one photo, not a blend)")
    if args.make_loss < 0 or (args.make_loss and (args.mixup or args.cutmix)):
        p.error("need --make-loss >= 0, and no --mixup or --cutmix beside it (their blended labels have no one make)")
    return args


def early_epochs(args: argparse.Namespace) -> int:
    """How many unfrozen epochs run at --early-size; a short run (fewer --epochs than
    --final-epochs) trains at --size throughout."""
    if args.final_epochs is None or args.early_size == args.size:
        return 0
    return max(0, args.epochs - args.final_epochs)


def progressive(args: argparse.Namespace) -> bool:
    return early_epochs(args) > 0


def build_dataloaders(args: argparse.Namespace, size: int | None = None):
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        Normalize,
        RandomSplitter,
        Resize,
        ResizeMethod,
        aug_transforms,
        get_image_files,
        imagenet_stats,
        parent_label,
    )

    method = {"squish": ResizeMethod.Squish, "crop": ResizeMethod.Crop, "pad": ResizeMethod.Pad}[args.resize]
    # Augmentations run without `size=`: with a size, aug_transforms also resizes by grid_sample at
    # validation time, which the exporter cannot reproduce with Pillow and therefore refuses.
    # With teachers, the distillation callback flips the images itself, to know which to give the
    # mirrored view's cached targets.
    augment = [] if args.no_augment else aug_transforms(max_rotate=8.0, max_zoom=1.15, max_warp=0.1,
                                                        max_lighting=0.3, p_lighting=0.75,
                                                        do_flip=not args.teacher)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=get_image_files,
        splitter=RandomSplitter(valid_pct=args.valid_pct, seed=args.seed),
        get_y=parent_label,
        item_tfms=Resize(size or args.size, method=method),
        batch_tfms=[*augment, Normalize.from_stats(*imagenet_stats)],
    )
    return block.dataloaders(args.data, bs=args.batch_size, num_workers=0)


def lite0_splitter(frozen_blocks: int):
    """Three parameter groups for Lite0: early body, late body, head."""
    from fastai.vision.all import params

    def split(model):
        body = model[0].model
        early = [body.conv_stem, body.bn1, *body.blocks[:frozen_blocks]]
        late = [*body.blocks[frozen_blocks:], body.conv_head, body.bn2]
        return [sum((params(m) for m in early), []), sum((params(m) for m in late), []), params(model[1])]

    return split


def build_learner(dls, args: argparse.Namespace):
    import torch
    from fastai.vision.all import LabelSmoothingCrossEntropyFlat, accuracy, vision_learner

    # Label smoothing helps with ~30 photos per class; its activation is still a plain softmax.
    common = dict(normalize=False, metrics=accuracy, loss_func=LabelSmoothingCrossEntropyFlat())
    if args.arch == "lite0":
        # train_bn=False: frozen BatchNorm layers stay frozen, so no gradient flows through the early blocks.
        # drop_path_rate goes through to timm.create_model.
        extra = dict(drop_path_rate=args.drop_path) if args.drop_path else {}
        learn = vision_learner(dls, backbones.EFFICIENTNET_LITE0, pretrained=False, train_bn=False,
                               splitter=lite0_splitter(args.frozen_blocks), **common, **extra)
        if not args.no_pretrained:
            count = backbones.load_lite0_weights(learn.model[0].model)
            print(f"loaded {count} ImageNet tensors into {backbones.EFFICIENTNET_LITE0}", file=sys.stderr)
    else:
        from torchvision import models

        arch = getattr(models, args.arch)
        learn = vision_learner(dls, arch, pretrained=not args.no_pretrained, **common)
    # Channels-last convolutions train ~1.5x faster on CPU (measured on Lite0 at 288 px).
    learn.model.to(memory_format=torch.channels_last)
    return with_make_loss(learn, args)


def with_make_loss(learn, args: argparse.Namespace):
    if args.make_loss:
        from .makeloss import MakeAwareLoss

        learn.loss_func = MakeAwareLoss(learn.loss_func, list(learn.dls.vocab), args.make_loss)
    return learn


def resume_learner(dls, args: argparse.Namespace):
    """An exported learner, given back its training data and splitter to train on."""
    import torch

    learn = learner_io.load(args.resume)
    if list(learn.dls.vocab) != list(dls.vocab):
        raise SystemExit(f"--resume {args.resume}: its classes differ from those in {args.data}")
    learn.dls = dls
    if args.arch == "lite0":
        learn.splitter, learn.train_bn = lite0_splitter(args.frozen_blocks), False
    learn.model.to(memory_format=torch.channels_last)
    return with_make_loss(learn, args)


def describe_run(args: argparse.Namespace, dls, loss: float, acc: float, inputs: dict) -> dict:
    """What `python -m export` needs to know about this run, stored beside the learner."""
    # Item paths are kept as fastai found them, under DATA: resolving them would follow symlinked
    # class folders out of the data folder.
    valid = [os.path.relpath(item, args.data) for item in dls.valid_ds.items]
    return {
        "versions": learner_io.installed_versions(),
        "data": str(args.data.resolve()),
        "valid_files": valid,
        "validation": {"accuracy": round(float(acc), 4), "loss": round(float(loss), 4), "images": len(valid),
                       "split": f"random {args.valid_pct:.0%} of the data, seed {args.seed}"},
        "training": checkpoint.recipe(args),
        # Everything that decided the weights (checkpoint.finished_as): the same command again skips the run.
        "inputs": inputs,
        # A resumed run's recipe is the whole chain: this run on top of the one it resumed.
        "resumed_from": learner_io.read_sidecar(args.resume).get("training") if args.resume else None,
    }


def training_callbacks(args: argparse.Namespace) -> list:
    """Callbacks for every fit: the image mixing, if any."""
    from fastai.callback.mixup import CutMix, MixUp

    if args.mixup:
        return [MixUp(args.mixup)]
    if args.cutmix:
        return [CutMix(args.cutmix)]
    return []


def choose_precision(args: argparse.Namespace) -> precision.Choice:
    """--precision resolved for this CPU; `auto` keeps the precision of the checkpoint in --out, if
    one will be continued."""
    stored = None if args.fresh or args.precision != precision.AUTO else checkpoint.stored_recipe(args.out)
    return precision.choose_precision(precision.read_cpu_flags(), args.precision,
                                      stored.get("precision") if stored else None)


def load_teachers(args: argparse.Namespace, classes: list[str]) -> list:
    """The --teacher models, each checked to be trained on the data's classes."""
    try:
        with distill.rng_untouched():
            teachers = [distill.load_teacher(path) for path in args.teacher]
        distill.check_classes(teachers, classes)
    except distill.TeacherError as exc:
        raise SystemExit(f"make train: {exc}") from None
    for teacher in teachers:
        print(f"teacher {teacher.name}: {len(teacher.labels)} classes at {teacher.size} px", file=sys.stderr)
    return teachers


def distillation(args: argparse.Namespace, learn, dls, train_loaders: list, teachers: list, fingerprint: str) -> list:
    """The teachers' targets, from OUT's cache or computed into it, wired into the learner's loss;
    the callback that hands each batch its rows."""
    items = list(dls.train_ds.items)
    classes = list(dls.vocab)
    key = distill.cache_key(teachers, fingerprint, distill.relative(items, args.data), classes)
    path = args.out / distill.CACHE
    try:
        logits = distill.read_cache(path, key)
    except distill.TeacherError as exc:
        raise SystemExit(f"make train: {exc}") from None
    if logits is None:
        logits = distill.teacher_logits(teachers, items, classes, args.precision, args.batch_size)
        distill.write_cache(path, key, logits)
    else:
        print(f"teacher outputs from {path}", file=sys.stderr)
    learn.loss_func = distill.DistillLoss(learn.loss_func, args.distill, args.temperature)
    targets = distill.soft_targets(logits, args.temperature)
    return [distill.Distill(learn.loss_func, targets, distill.item_labels(items, classes), not args.no_augment,
                           train_loaders)]


def reseed(run_seed: int, loaders: list) -> None:
    """Everything random in training from `run_seed`: the generators, and each loader's own one.
    The split is made by then; RandomSplitter also reseeds torch's generator with --seed while the
    loaders are built, which is why this comes after them."""
    import random

    from fastai.vision.all import set_seed

    set_seed(run_seed, reproducible=True)
    for loader in loaders:
        loader.rng = random.Random(random.randint(0, 2**32 - 1))


def run_plan(args: argparse.Namespace, train_batches: int, valid_batches: int) -> progress.Plan:
    """Every epoch of the run in order: the head-only ones (unless continuing an exported learner),
    then the unfrozen ones, each with the size it trains at."""
    early = args.early_size if progressive(args) else args.size
    n_early = early_epochs(args)
    head = [] if args.resume else [(checkpoint.HEAD, e, early) for e in range(args.freeze_epochs)]
    body = [(checkpoint.BODY, e, early if e < n_early else args.size) for e in range(args.epochs)]
    return progress.Plan(head + body, train_batches, valid_batches)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from fastai.vision.all import get_image_files, set_seed, trainable_params

    from .stages import SwitchSize, WeightAverage

    items = get_image_files(args.data)
    try:
        datafolder.check(items, args.data)
    except datafolder.DataFolderError as exc:
        raise SystemExit(f"make train: {exc}") from None
    if args.resume is not None and not args.resume.is_file():
        raise SystemExit(f"make train: --resume {args.resume} is not a file")

    set_seed(args.seed, reproducible=True)
    dls = build_dataloaders(args)
    early = build_dataloaders(args, args.early_size) if progressive(args) else dls
    if list(early.vocab) != list(dls.vocab) or len(early.train) != len(dls.train):
        raise SystemExit("the early-size dataloaders differ from the final ones")  # same items by construction
    # Each dataloader shuffles with a generator of its own, which a resumed run must restore too.
    loaders = [early.train, early.valid] + ([dls.train, dls.valid] if early is not dls else [])
    if args.run_seed is not None and args.run_seed != args.seed:
        reseed(args.run_seed, loaders)
    print(f"{len(dls.vocab)} classes, {len(dls.train_ds)} training and {len(dls.valid_ds)} validation images, "
          f"{args.size} px {args.resize}"
          + (f" ({args.early_size} px for the first epochs)" if progressive(args) else "")
          + f", torch threads {torch.get_num_threads()}", file=sys.stderr)
    teachers = load_teachers(args, list(dls.vocab))
    learn = resume_learner(dls, args) if args.resume else build_learner(dls, args)
    requested = args.precision
    choice = choose_precision(args)
    # The recipe stores what was chosen, not what was asked: `auto` is bf16 on one host and fp32 on
    # another, and a checkpoint must be continued in the precision it was made in.
    args.precision = choice.precision
    print(choice.describe(), file=sys.stderr)
    fingerprint = checkpoint.data_fingerprint(items, args.data)
    checkpoints = checkpoint.Checkpoints(args.out, checkpoint.recipe(args), fingerprint,
                                         checkpoint.weights_digest(learn.model) if args.resume else None,
                                         [t.digest for t in teachers])
    learner_file = args.out / "export.pkl"
    if args.fresh:
        checkpoints.remove()
        (args.out / distill.CACHE).unlink(missing_ok=True)
    elif learner_file.is_file() and checkpoint.finished_as(learner_io.read_sidecar(learner_file), checkpoints.inputs(),
                                                           any_precision=requested == precision.AUTO):
        print(f"{learner_file} is this run's already (same recipe, photos, starting weights and teachers); "
              "skipped. Pass --fresh to train it again", file=sys.stderr)
        return 0
    try:
        saved = checkpoints.read()
    except checkpoint.CheckpointMismatch as exc:
        raise SystemExit(f"make train: {exc}") from None
    taught = distillation(args, learn, dls, [early.train, dls.train], teachers, fingerprint) if teachers else []
    if args.quiet:
        from fastai.callback.progress import ProgressCallback
        from fastcore.basics import noop
        learn.remove_cb(ProgressCallback)
        # Without the bar, fastai prints each epoch's raw values as a list; the epoch lines say it in words.
        learn.logger = noop

    plan = run_plan(args, len(dls.train), len(dls.valid))
    done = plan.index(saved.position.phase, saved.position.epoch) + 1 if saved else 0
    if saved:
        plan.restore(saved.seconds, checkpoint.BODY)
        print(f"going on from the checkpoint after epoch {done} of {len(plan.epochs)} ({checkpoints.path})",
              file=sys.stderr)
    if done < len(plan.epochs):
        bf16 = args.precision == precision.BF16
        plan.estimate_from_steps({size: progress.step_seconds(learn.model, args.batch_size, size, bf16=bf16)
                                  for size in plan.unmeasured_sizes(done)})
        print(f"training: {plan.describe(done)}", file=sys.stderr, flush=True)
    clock = progress.Clock(plan)
    per_batch = [*training_callbacks(args), *taught, precision.ChannelsLastAutocast(args.precision)]
    n_early = early_epochs(args)
    average = WeightAverage(args.ema, start_epoch=n_early) if args.ema else None
    started = time.perf_counter()

    def phase_start(phase: str, epochs: int) -> int | None:
        return 0 if saved is None else saved.position.start_of(phase, epochs)

    def saving(phase: str, start: int, before: int) -> list:
        return [checkpoint.SaveEachEpoch(checkpoints, phase, start, loaders, clock,
                                         average if phase == checkpoint.BODY else None, args.stop_after, before)]

    def continue_from_checkpoint(phase: str) -> None:
        """Put the saved state back into a learner frozen for `phase`, right before its fit."""
        if saved is not None and saved.position.phase == phase:
            saved.load_into(learn, loaders, average)

    try:
        head_epochs = 0 if args.resume else args.freeze_epochs
        start = phase_start(checkpoint.HEAD, head_epochs)
        if head_epochs and start is not None:
            learn.freeze()
            continue_from_checkpoint(checkpoint.HEAD)
            learn.fit_one_cycle(head_epochs, args.lr, start_epoch=start,
                                cbs=[*per_batch, SwitchSize(early, dls, head_epochs),
                                     *saving(checkpoint.HEAD, start, 0)])
        if saved is not None and saved.position.phase == checkpoint.HEAD and start is None:
            learn.freeze()  # the head phase is over: its state goes back, and freeze_to below clears the optimiser
            saved.load_into(learn, loaders)
        if args.arch == "lite0":
            learn.freeze_to(1)
        else:
            learn.unfreeze()
        start = phase_start(checkpoint.BODY, args.epochs)
        if args.epochs and start is not None:
            continue_from_checkpoint(checkpoint.BODY)
            learn.fit_one_cycle(args.epochs, slice(args.lr / 20, args.lr / 2), start_epoch=start,
                                cbs=[*per_batch, SwitchSize(early, dls, n_early), *([average] if average else []),
                                     *saving(checkpoint.BODY, start, head_epochs)])
        elif saved is not None and saved.position.phase == checkpoint.BODY:
            saved.load_into(learn, loaders, average)  # every epoch had run: only the saving was left
    except checkpoint.StopRun as stop:
        print(f"stopped after epoch {stop.epochs_done} of {len(plan.epochs)}; the checkpoint is {checkpoints.path}: "
              "run the same command without --stop-after to go on", file=sys.stderr)
        return 0
    learn.dls = dls
    # The final figures are the served model's: fp32, whatever the epochs trained in.
    served = [precision.ChannelsLastAutocast(precision.FP32)]
    if average is not None:
        loss, acc = learn.validate(cbs=served)
        print(f"validation accuracy of the last weights: {acc:.4f} (loss {loss:.4f})", file=sys.stderr)
        if average.apply(learn.model):
            print(f"averaged the weights over {average.steps} steps (decay {args.ema})", file=sys.stderr)
    loss, acc = learn.validate(cbs=served)
    # The closure-based splitter is only needed for training; the exported learner keeps fastai's
    # own. The optimizer goes too: its state is shaped by the old splitter and is not exported.
    # The make loss goes as well, so that unpickling the learner needs fastai alone.
    learn.splitter, learn.opt = trainable_params, None
    while hasattr(learn.loss_func, "base"):  # the distillation loss, then the make loss
        learn.loss_func = learn.loss_func.base
    args.out.mkdir(parents=True, exist_ok=True)
    target = learner_file.resolve()
    # The weights are written before anything that could fail while describing the run.
    learn.export(target)
    learner_io.write_sidecar(target, describe_run(args, dls, loss, acc, checkpoints.inputs()))
    minutes = (time.perf_counter() - started) / 60
    print(f"saved {target} after {minutes:.1f} min")
    print(f"validation accuracy: {acc:.4f} ({len(dls.valid_ds)} images, loss {loss:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
