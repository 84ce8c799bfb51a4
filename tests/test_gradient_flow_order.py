"""GradientFlow's layers: names (tied, frozen, unused parameters, wrapper prefixes), data-flow
order (also under torch.compile) and the main path to the output (auxiliary heads, the zoo's
GoogLeNet and ViT)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtrace import GradientFlow, GradientFlowWarning
from gradtrace.measure import parameter_names
from gradtrace.models import AuxLogits
from helpers.fits import fit
from helpers.records import assert_record_matches, by_step
from helpers.tiny import CLASSES, FLOW, HIDDEN, IN, Classifier, TinyNet, make_data


class Odd(nn.Module):
    """A shared (tied), a frozen and an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(IN, IN)
        self.a = nn.Linear(IN, IN, bias=False)
        self.frozen = nn.Linear(IN, IN, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.b = nn.Linear(IN, IN, bias=False)
        self.b.weight = self.a.weight  # tied: one parameter, two uses
        self.out = nn.Linear(IN, CLASSES, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.frozen(torch.tanh(self.a(x))))
        return self.out(torch.tanh(self.b(x)))


class Scaled(Classifier):
    """Owns a parameter used in training_step: its module is never called."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.scale = nn.Parameter(torch.ones(CLASSES))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x) * self.scale, y)


def test_shared_frozen_and_unused_parameters(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = Scaled(Odd())
    cb = GradientFlow(every_n_steps=1, include=["*.bias", "scale"])
    fit(tmp_path, model, cb, max_steps=2)

    # frozen and unused never appear; the tied weight once, under its first name; the
    # parameter of a module that is never called comes last
    assert cb.layer_order == ["net.a.weight", "net.out.weight", "scale"]
    assert len(cb.history) == 2 * 3
    for seen in model.seen:
        for layer, record in by_step(cb.history)[seen["step"]].items():
            assert_record_matches(record, seen["grads"][layer])


def test_wrapper_prefixes_are_stripped() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dp = nn.DataParallel(nn.Sequential(nn.Linear(2, 2)))
            self.module = nn.Linear(2, 2)  # an ordinary child called "module" is kept

    holder = Holder()
    assert list(parameter_names(holder).values()) == [
        "dp.0.weight",
        "dp.0.bias",
        "module.weight",
        "module.bias",
    ]


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model(tmp_path: Path, backend: str) -> None:
    torch.manual_seed(6)
    torch._dynamo.reset()
    net = TinyNet()
    reference = copy.deepcopy(net)
    compiled = torch.compile(net, backend=backend)
    model = Classifier(compiled, lr=0.0)
    data = make_data(8)
    compiled(data[:4][0])  # compiled in training mode before the callback's hooks exist
    cb = GradientFlow(every_n_steps=1)
    fit(tmp_path, model, cb, data=data)

    # names without "_orig_mod.", data-flow order although hooks cannot see compiled code
    assert cb.layer_order == FLOW
    assert torch._dynamo.eval_frame._stance.stance == "default"  # stance restored
    for step, layers in by_step(cb.history).items():
        x, y = data[step * 4 : step * 4 + 4]
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        for layer, record in layers.items():
            assert_record_matches(record, reference.get_parameter(layer[len("net.") :]).grad)
    # no forward pre-hook left behind
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_compiled_model_without_set_stance_falls_back_to_registration_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch < 2.6 has no set_stance: hooks would be compiled into the graph, so none are set,
    # and AOT autograd gives one backward node for the whole compiled graph
    monkeypatch.delattr(torch.compiler, "set_stance")
    torch._dynamo.reset()
    net = TinyNet()
    cb = GradientFlow(every_n_steps=1)
    with pytest.warns(GradientFlowWarning, match="layers are in registration order"):
        fit(tmp_path, Classifier(torch.compile(net, backend="aot_eager")), cb, max_steps=1)
    assert cb.layer_order == ["net.head.weight", "net.hidden.weight", "net.inp.weight"]
    assert all(not m._forward_pre_hooks for m in net.modules())


class WithAuxHead(nn.Module):
    """Returns ``AuxLogits`` like GoogLeNet; the auxiliary head is called after the main head,
    so data-flow order alone would make it the output end."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, HIDDEN)
        self.fc = nn.Linear(HIDDEN, CLASSES)
        self.aux = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> AuxLogits:
        h = torch.tanh(self.inp(x))
        return AuxLogits(self.fc(h), (self.aux(h),))


class AuxClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        return F.cross_entropy(out.logits, y) + 0.3 * F.cross_entropy(out.aux[0], y)


def test_auxiliary_heads_are_measured_but_never_the_output_end(tmp_path: Path) -> None:
    torch.manual_seed(21)
    cb = GradientFlow(every_n_steps=1, plot=False)
    fit(tmp_path, AuxClassifier(WithAuxHead()), cb, max_steps=2)
    # the auxiliary loss is scaled (one more autograd node): its head lies farther from it
    assert cb.layer_order == ["net.inp.weight", "net.aux.weight", "net.fc.weight"]
    assert cb.main_path == ["net.inp.weight", "net.fc.weight"]
    last = by_step(cb.history)[1]
    assert cb.input_output_ratio() == pytest.approx(
        last["net.inp.weight"]["mean_abs"] / last["net.fc.weight"]["mean_abs"]
    )


def test_zoo_googlenet_output_end_is_the_main_head_and_vit_starts_at_patches() -> None:
    """One watched batch of the real models (what the callback does on its first batch)."""
    pytest.importorskip("timm")
    from gradtrace.measure import parameter_names, select_layers
    from gradtrace.measure.order import LayerOrder
    from gradtrace.models import AuxLogits, create_model

    for arch, kwargs in (("googlenet", {"stem": "cifar"}), ("vit_tiny_cifar", {})):
        torch.manual_seed(28)
        root = nn.Module()
        root.net = create_model(arch, num_classes=10, **kwargs)
        order = LayerOrder()
        order.start(parameter_names(root), keep=False)
        order.watch(root)
        out = root.net(torch.randn(2, 3, 32, 32))
        y = torch.tensor([1, 2])
        if isinstance(out, AuxLogits):
            aux_loss = sum(F.cross_entropy(logits, y) for logits in out.aux)
            loss = F.cross_entropy(out.logits, y) + 0.3 * aux_loss
        else:
            loss = F.cross_entropy(out, y)
        order.backward(loss)
        order.end_watch()
        selected = {layer.name for layer in select_layers(root)}
        layers = [n for n in order.order if n in selected]
        main = [n for n in layers if n in order.main_path]
        if arch == "googlenet":
            aux = [n for n in layers if n.startswith("net.aux")]
            assert aux  # measured ...
            assert not set(aux) & set(main)  # ... but off the main path
            assert main[-1] == "net.fc.weight"
            assert main[0] == layers[0]
        else:
            assert layers[0] == main[0] == "net.patch_embed.proj.weight"
            assert main[-1] == "net.head.weight"
