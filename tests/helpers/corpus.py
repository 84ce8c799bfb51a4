"""Tiny models that are not the CNNs GradientFlow was written around, as Lightning projects.

Each :class:`Case` builds a LightningModule and its data: the zoo's models, torchvision and
timm models, Transformers (encoder, encoder-decoder, tied embeddings), recurrent layers, a
GAN under manual optimization, a UNet, LoRA on a frozen backbone, functional activations,
accumulation with clipping under bf16-mixed, and ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["CASES", "Case", "Classify", "zoo_case"]

VOCAB, WIDTH, SEQ = 40, 16, 10


class Classify(pl.LightningModule):
    """Cross-entropy on the network's output (main logits plus 0.3 x auxiliary ones; for
    sequence outputs ``[B, T, V]``, every position)."""

    def __init__(self, net: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.net(*inputs)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        *inputs, y = batch
        out = self(*inputs)
        aux = getattr(out, "aux", ())
        logits = getattr(out, "logits", out)
        if y.dim() > 1:  # a label per position
            return F.cross_entropy(logits.flatten(0, -2), y.flatten())
        return F.cross_entropy(logits, y) + 0.3 * sum(F.cross_entropy(a, y) for a in aux)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def images(n: int, size: int = 32, channels: int = 3, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=g)
    return TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def tokens(n: int, labels: str = "class") -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    if labels == "class":
        return TensorDataset(x, torch.randint(0, 10, (n,), generator=g))
    return TensorDataset(x, torch.roll(x, -1, dims=1))  # next token


@dataclass
class Case:
    """One model of the corpus."""

    name: str
    build: Callable[[], pl.LightningModule]
    data: Callable[[], TensorDataset]
    trainer: dict[str, Any] = field(default_factory=dict)
    unhooked: bool = False
    """Whether some recorded layers have no activation statistics (said in one warning)."""
    slow: bool = False
    window: int = 1
    """Batches in the first optimizer step (gradient accumulation)."""
    batch_size: int = 2
    steps: int = 2
    """Logging steps the fit runs (batches that step)."""


# --------------------------------------------------------------------------- the zoo

# Each at 32x32 with the options the zoo documents for small images (the ImageNet heads of
# VGG, AlexNet and GoogLeNet would be 100M-parameter linear layers of the same kind).
_ZOO_OPTIONS = {
    "googlenet": {"stem": "cifar"},
    "alexnet": {"stem": "cifar"},
    **{name: {"head": "cifar"} for name in ("vgg", "vgg11", "vgg13", "vgg16", "vgg19")},
}
# Over 20M parameters or 150 ms a step on one CPU thread: CI runs them in the slow tier.
_ZOO_SLOW = {"resnet34", "resnet50", "resnet101", "resnet152", "swin_tiny_cifar"}
_ZOO_SLOW |= {
    "vgg",
    "vgg13",
    "vgg16",
    "vgg19",
    "vit_small_cifar",
    "googlenet",
    "plain110",
    "alexnet",
}


def zoo_case(name: str) -> Case:
    from gradtrace.models import create_model

    def build() -> pl.LightningModule:
        torch.manual_seed(0)
        return Classify(create_model(name, num_classes=10, **_ZOO_OPTIONS.get(name, {})))

    return Case(f"zoo:{name}", build, lambda: images(4), slow=name in _ZOO_SLOW)


# --------------------------------------------------------------------------- torchvision, timm


def _torchvision(name: str) -> Callable[[], pl.LightningModule]:
    def build() -> pl.LightningModule:
        import torchvision

        torch.manual_seed(0)
        return Classify(getattr(torchvision.models, name)(num_classes=10))

    return build


def _torchvision_vit() -> pl.LightningModule:
    """torchvision's ViT (``nn.MultiheadAttention`` inside), two tiny layers at 32x32."""
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    return Classify(vit)


def _timm(name: str) -> Callable[[], pl.LightningModule]:
    def build() -> pl.LightningModule:
        import timm

        torch.manual_seed(0)
        return Classify(timm.create_model(name, pretrained=False, num_classes=10))

    return build


# --------------------------------------------------------------------------- sequences


class TextEncoder(nn.Module):
    """Embedding, a two-layer ``nn.TransformerEncoder``, mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class Seq2Seq(nn.Module):
    """``nn.Transformer`` encoder-decoder over tokens, predicting the next token."""

    def __init__(self) -> None:
        super().__init__()
        self.src = nn.Embedding(VOCAB, WIDTH)
        self.tgt = nn.Embedding(VOCAB, WIDTH)
        self.transformer = nn.Transformer(WIDTH, 2, 1, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.transformer(self.src(x), self.tgt(x), tgt_mask=mask))


class TiedLanguageModel(nn.Module):
    """Embedding, one Transformer layer, and the embedding again as the output head (through
    ``F.linear``, as GPT-2 and most language models tie them)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.block(self.embed(x)), self.embed.weight)


class TiedHead(nn.Module):
    """An ``nn.Linear`` head whose weight is the embedding's (tied by assignment)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(x))))


class Recurrent(nn.Module):
    """Embedding, a recurrent layer, the last time step's output, a linear head."""

    def __init__(self, kind: type[nn.RNNBase], **options: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.rnn = kind(WIDTH, WIDTH, batch_first=True, **options)
        out = WIDTH * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(out, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0][:, -1])


# --------------------------------------------------------------------------- other shapes


class GAN(pl.LightningModule):
    """A generator and a critic, two optimizers, manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 12), nn.Tanh()
        )
        self.critic = nn.Sequential(
            nn.Linear(12, 32),
            nn.LeakyReLU(0.2),
            nn.Linear(32, 32),
            nn.LeakyReLU(0.2),
            nn.Linear(32, 1),
        )

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 8)
        fake = self.generator(z)
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = F.binary_cross_entropy_with_logits(
            self.critic(real), ones
        ) + F.binary_cross_entropy_with_logits(self.critic(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.critic(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.Adam(self.critic.parameters(), lr=1e-3),
        ]


class UNet(nn.Module):
    """Two resolutions, a skip connection by concatenation, a per-pixel classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc1(x)
        deep = self.enc2(F.max_pool2d(skip, 2))
        return self.out(self.dec(torch.cat([self.up(deep), skip], dim=1)))


class Segment(Classify):
    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


def segmentation(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n, 16, 16), generator=g)
    )


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B(A(x))`` (B starts at 0)."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


def lora() -> nn.Module:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()
    )
    backbone.requires_grad_(False)
    backbone[1], backbone[3] = LoRALinear(backbone[1]), LoRALinear(backbone[3])
    return nn.Sequential(backbone, nn.Linear(32, 10))


class Functional(nn.Module):
    """Activations called as functions and methods, not modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x)).flatten(1)
        h = F.gelu(self.fc1(h))
        return self.fc3(self.fc2(h).sigmoid())


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def compiled_cnn() -> pl.LightningModule:
    torch._dynamo.reset()
    return Classify(torch.compile(small_cnn()))


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], pl.LightningModule]:
    def build() -> pl.LightningModule:
        torch.manual_seed(0)
        return Classify(make())

    return build


CASES: list[Case] = [
    Case("torchvision:resnet18", _torchvision("resnet18"), lambda: images(4)),
    Case("torchvision:mobilenet_v3_small", _torchvision("mobilenet_v3_small"), lambda: images(4)),
    Case("torchvision:convnext_tiny", _torchvision("convnext_tiny"), lambda: images(4), slow=True),
    # Swin applies its attention weights with F.linear, never calling their Linear modules
    Case("torchvision:swin_t", _torchvision("swin_t"), lambda: images(4), slow=True),
    Case("torchvision:vit", _torchvision_vit, lambda: images(4), unhooked=True),
    Case("timm:resnet10t", _timm("resnet10t"), lambda: images(4)),
    Case("timm:efficientnet_b0", _timm("efficientnet_b0"), lambda: images(4), slow=True),
    Case("timm:convnext_atto", _timm("convnext_atto"), lambda: images(4)),
    Case("transformer-encoder", _seeded(TextEncoder), lambda: tokens(4), unhooked=True),
    Case("transformer-encoder-decoder", _seeded(Seq2Seq), lambda: tokens(4, "next"), unhooked=True),
    Case(
        "tied-embedding-functional",
        _seeded(TiedLanguageModel),
        lambda: tokens(4, "next"),
        unhooked=True,
    ),
    Case("tied-embedding-module", _seeded(TiedHead), lambda: tokens(4, "next")),
    Case(
        "lstm-2-layers",
        _seeded(lambda: Recurrent(nn.LSTM, num_layers=2)),
        lambda: tokens(4),
        unhooked=True,
    ),
    Case(
        "gru-bidirectional",
        _seeded(lambda: Recurrent(nn.GRU, bidirectional=True)),
        lambda: tokens(4),
        unhooked=True,
    ),
    Case(
        "gan-manual-optimization",
        GAN,
        lambda: TensorDataset(torch.randn(4, 12)),
        trainer={"max_steps": 4},  # two optimizer steps per batch
    ),
    Case("unet-skip-concat", lambda: Segment(UNet()), lambda: segmentation(4)),
    Case("lora-frozen-backbone", _seeded(lora), lambda: images(4, size=8)),
    Case("functional-activations", _seeded(Functional), lambda: images(4, size=8)),
    Case(
        "accumulation-clipping-bf16",
        _seeded(small_cnn),
        lambda: images(8, size=8),
        trainer={"accumulate_grad_batches": 2, "gradient_clip_val": 0.1, "precision": "bf16-mixed"},
        window=2,
    ),
    Case("torch-compile", compiled_cnn, lambda: images(4, size=8), slow=True),
]
