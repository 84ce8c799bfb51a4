"""``make reproduce-architectures``: how gradients flow through VGG, ResNet, GoogLeNet, ViT and
Swin, side by side, with the sources' claims checked (run as
``python -m gradtrace.studies.architectures``; see :mod:`.reproduce`)."""
