"""The gradtrace model zoo: ``create_model(name, ...)``, ``list_models()`` and ``summarize()``.

Importing this package registers every family: the coursework VGG of Table 1, classic VGG and
the CIFAR-10 VGG, ResNets (CIFAR and ImageNet), GoogLeNet, AlexNet, and timm's ViT and Swin.
Only torch is imported here: timm is imported when a ViT or Swin is built, and
torchvision never (it serves only as the tests' reference).
"""

from gradtrace.models import (  # noqa: F401  (importing a family registers its models)
    alexnet,
    coursework_vgg,
    googlenet,
    resnet,
    timm_models,
    vgg,
)
from gradtrace.models.layers import AuxLogits
from gradtrace.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_model,
)
from gradtrace.models.summary import CostRow, CostTable, summarize

__all__ = [
    "AuxLogits",
    "CostRow",
    "CostTable",
    "ModelInfo",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "summarize",
]
