"""The packaged Lite0 weights are genuine ImageNet weights for timm's tf_efficientnet_lite0."""

import torch
from PIL import Image

from tests.support.paths import car_photos
from train import backbones


def photos(size=224) -> torch.Tensor:
    tensors = []
    for path in car_photos():
        image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        tensors.append(raw.view(size, size, 3).permute(2, 0, 1).float() / 255)
    return torch.stack(tensors)


def test_weights_rank_car_photos_as_cars_and_fit_the_tf_variant():
    images = photos()
    tf_top1, tf_mass = backbones.imagenet_car_mass("tf_efficientnet_lite0", images)
    pt_top1, pt_mass = backbones.imagenet_car_mass("efficientnet_lite0", images)
    half_top1, half_mass = backbones.imagenet_car_mass("tf_efficientnet_lite0", images, (0.5,) * 3, (0.5,) * 3)
    assert tf_top1 >= 0.9, "car photos should be ranked as car-like ImageNet classes"
    # "Same" padding and BN eps 1e-3 with ImageNet mean/std fit best: these are TF-trained weights.
    assert tf_mass > pt_mass and tf_mass > half_mass


def test_weights_map_onto_the_headless_model_used_for_training():
    import timm

    model = timm.create_model(backbones.EFFICIENTNET_LITE0, pretrained=False, num_classes=0)
    assert backbones.load_lite0_weights(model) == len(model.state_dict())
    stem = model.conv_stem.weight
    assert torch.equal(stem, backbones.lite0_state_dict()["_conv_stem.weight"])
