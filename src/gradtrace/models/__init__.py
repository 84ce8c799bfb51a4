"""The gradtrace model zoo: ``create_model(name, ...)`` and ``list_models()``.

Importing this package registers every family. Families that need optional packages
(timm for ViT/Swin) import them only when such a model is built.
"""

from gradtrace.models import coursework_vgg  # noqa: F401  (registers vgg, vgg08, vgg38)
from gradtrace.models.layers import AuxLogits
from gradtrace.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_model,
)

__all__ = ["AuxLogits", "ModelInfo", "create_model", "list_models", "model_info", "register_model"]
