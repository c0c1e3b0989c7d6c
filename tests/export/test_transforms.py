"""serve.preprocess must give the same pixels as fastai's own validation transforms."""

import pytest
from fastai.vision.all import CropPad, PadMode, PILImage, RandomResizedCrop, Resize, ResizeMethod
from fastai.vision.augment import RandomResizedCropGPU, aug_transforms
from PIL import Image

from export.transforms import UnsupportedTransform, _item_steps, read_pipeline
from serve.preprocess import apply_steps
from tests.support.paths import car_photos


def photos():
    """Real photos of different sizes and aspect ratios, plus a very tall and a tiny one."""
    images = [Image.open(p).convert("RGB") for p in car_photos()[::3]]
    base = images[0]
    images.append(base.resize((23, 170)))   # taller than wide, smaller than the target
    images.append(base.resize((7, 5)))      # far smaller than the target on both sides
    return images


TRANSFORMS = [
    *[Resize(size, method=m, pad_mode=pm)
      for size in (64, (48, 80)) for m in (ResizeMethod.Squish, ResizeMethod.Crop, ResizeMethod.Pad)
      for pm in (PadMode.Zeros, PadMode.Border, PadMode.Reflection)],
    Resize(96, method=ResizeMethod.Squish, resamples=(Image.Resampling.BICUBIC, Image.Resampling.NEAREST)),
    Resize(96, method=ResizeMethod.Crop, resamples=(Image.Resampling.NEAREST, Image.Resampling.NEAREST)),
    RandomResizedCrop(64),
    RandomResizedCrop((48, 80), val_xtra=0.2),
    CropPad(120),
    CropPad((300, 90), pad_mode=PadMode.Reflection),
]


@pytest.mark.parametrize("tfm", TRANSFORMS, ids=lambda t: f"{type(t).__name__}-{t.size}-"
                         f"{getattr(t, 'method', '')}-{getattr(t, 'pad_mode', '')}-{getattr(t, 'mode', '')}")
def test_pillow_steps_match_fastai_pixels(tfm):
    steps = _item_steps(tfm)
    for image in photos():
        theirs = tfm(PILImage.create(image.copy()), split_idx=1)
        ours = apply_steps(image.copy(), steps)
        assert ours.size == theirs.size
        # Exact: same Pillow calls on the same pixels.
        assert ours.tobytes() == theirs.tobytes(), f"{image.size} differs"


def _dls(item_tfms, batch_tfms):
    from fastai.vision.all import CategoryBlock, DataBlock, ImageBlock, RandomSplitter, get_image_files, parent_label

    from tests.support.paths import CARS
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=RandomSplitter(0.25, seed=0), item_tfms=item_tfms, batch_tfms=batch_tfms)
    return block.dataloaders(CARS, bs=4, num_workers=0)


def test_training_only_augmentations_are_skipped():
    pipe = read_pipeline(_dls(Resize(64), aug_transforms()))
    assert pipe.steps == _item_steps(Resize(64))
    assert pipe.div == 255.0
    assert "Flip" in pipe.skipped or pipe.identity  # flips are folded into the affine transform


def test_aug_transforms_with_size_is_refused():
    with pytest.raises(UnsupportedTransform, match=r"aug_transforms\(size="):
        read_pipeline(_dls(Resize(96), aug_transforms(size=64)))


def test_gpu_random_resized_crop_is_refused():
    with pytest.raises(UnsupportedTransform, match="RandomResizedCropGPU"):
        read_pipeline(_dls(Resize(96), [RandomResizedCropGPU(64)]))


def test_unknown_item_transform_is_refused():
    from fastai.vision.all import Transform

    class Sharpen(Transform):
        def encodes(self, x: PILImage):
            return x

    with pytest.raises(UnsupportedTransform, match="Sharpen"):
        read_pipeline(_dls([Resize(64), Sharpen()], []))


def test_missing_resize_is_refused():
    with pytest.raises(UnsupportedTransform, match="Resize"):
        read_pipeline(_dls([], []))
