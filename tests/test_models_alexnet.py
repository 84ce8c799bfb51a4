"""AlexNet: the layer table of the lecture notes "Lecture 8: CNN Architectures I" and
torchvision parity."""

from __future__ import annotations

import torch
import torchvision

from gradtrace.models import create_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_count_and_output_shape_match_torchvision() -> None:
    torch.manual_seed(0)
    ours = create_model("alexnet").eval()
    theirs = torchvision.models.alexnet().eval()
    assert n_params(ours) == n_params(theirs) == 61_100_840
    # Same layout: loading torchvision's weights in order gives the same function.
    with torch.no_grad():
        for mine, reference in zip(ours.parameters(), theirs.parameters()):
            mine.copy_(reference)
        x = torch.randn(2, 3, 227, 227)
        out = ours(x)
        assert out.shape == (2, 1000)
        torch.testing.assert_close(out, theirs(x))


def test_layer_parameters_match_the_lecture() -> None:
    with torch.device("meta"):
        model = create_model("alexnet")
    lecture = {
        "conv1": 23_296,
        "conv2": 307_392,
        "conv3": 663_936,
        "conv4": 884_992,
        "conv5": 590_080,
        "fc6": 37_752_832,
        "fc7": 16_781_312,
        "fc8": 4_097_000,
    }
    layers = dict(model.features.named_children()) | dict(model.classifier.named_children())
    assert {name: n_params(layers[name]) for name in lecture} == lecture
    conv1 = model.features.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((11, 11), (4, 4), (2, 2))


def test_feature_map_sizes_for_227() -> None:
    with torch.device("meta"):
        model = create_model("alexnet")
        x = torch.empty(1, 3, 227, 227)
        sizes = {}
        for name, layer in model.features.named_children():
            x = layer(x)
            sizes[name] = tuple(x.shape[1:])
    assert sizes["conv1"] == (64, 56, 56)
    assert sizes["pool1"] == (64, 27, 27)
    assert sizes["pool2"] == (192, 13, 13)
    assert sizes["pool5"] == (256, 6, 6)


def test_cifar_stem() -> None:
    with torch.device("meta"):
        model = create_model("alexnet", stem="cifar", num_classes=10)
        x = torch.empty(2, 3, 32, 32)
        sizes = []
        for layer in model.features:
            x = layer(x)
            sizes.append(x.shape[-1])
    conv1 = model.features.conv1
    assert (conv1.kernel_size, conv1.stride) == ((3, 3), (1, 1))
    assert sizes[:3] == [32, 32, 15]
    assert sizes[-1] == 3  # then the adaptive pool brings it to 6x6
    assert n_params(model) == 61_100_840 - 23_296 + (3 * 64 * 9 + 64) - 4_097_000 + 40_970
