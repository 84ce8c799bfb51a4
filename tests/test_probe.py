"""``gradtrace.probe``: a model's gradient flow on one batch, checked against hand-written
forward and backward passes, the coursework's VGG38 numbers (REFERENCE: plain VGG38's first
layer gets ~1e-14 of its last layer's mean |grad| at initialisation, BN ~3e2, RC ~1e-2, BN + RC
~2e1), models the fixtures were not written around, and its figure."""

from __future__ import annotations

import copy
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtrace import probe
from gradtrace.measure import ProbeResult, random_batch
from gradtrace.measure.probe import classification_loss
from gradtrace.models import AuxLogits, create_model

IN, HIDDEN, CLASSES = 12, 16, 5


class HeadFirst(nn.Module):
    """Registered head-first, called input-first: registration order is not data-flow order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(HIDDEN, CLASSES)
        self.hidden = nn.Linear(HIDDEN, HIDDEN)
        self.inp = nn.Linear(IN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.hidden(F.relu(self.inp(x)))))


FLOW = ["inp", "hidden", "head"]  # data-flow order of HeadFirst's layers


def vectors(seed: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(batch, IN, generator=g), torch.randint(0, CLASSES, (batch,), generator=g)


def by_hand(net: HeadFirst, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, list[float]]:
    """Forward, cross-entropy, backward; per layer in data-flow order: mean |grad| of the
    weight, RMS and fraction of zeros after the ReLU of the layer's output."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(net, name).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach())
        )
        for name in FLOW
    ]
    x, y = batch
    net.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    for hook in hooks:
        hook.remove()
    return {
        "mean_abs": [float(getattr(net, n).weight.grad.abs().mean()) for n in FLOW],
        # mean and Bessel-corrected std, as the activation statistics record them
        "act_rms": [math.hypot(outputs[n].mean(), outputs[n].std()) for n in FLOW],
        # the hidden layers' ReLU outputs; the head's output goes to the loss as it is
        "act_zero_frac": [float((F.relu(outputs[n]) == 0).float().mean()) for n in FLOW[:2]]
        + [float((outputs["head"] == 0).float().mean())],
        "loss": [float(loss.detach())],
    }


def fitted_slope(values: list[float]) -> float:
    depth = np.linspace(0.0, 1.0, len(values))
    return float(np.polyfit(depth, np.log10(values), 1)[0])


def test_the_probe_equals_a_hand_written_pass() -> None:
    seeds = (0, 1, 2)
    result = probe(HeadFirst, vectors, seeds=seeds)
    assert result.layers == [f"{name}.weight" for name in FLOW]
    assert result.off_path == []
    assert [r["depth"] for r in result.records[:3]] == [0.0, 0.5, 1.0]
    expected = {}
    for seed in seeds:
        torch.manual_seed(seed)
        expected[seed] = by_hand(HeadFirst(), vectors(seed))
    for seed in seeds:
        assert result.per_seed()[seed] == pytest.approx(expected[seed]["mean_abs"], rel=1e-6)
        assert result.per_seed("act_rms")[seed] == pytest.approx(
            expected[seed]["act_rms"], rel=1e-5
        )
        assert result.per_seed("act_zero_frac")[seed] == pytest.approx(
            expected[seed]["act_zero_frac"]
        )
    assert list(result.losses) == pytest.approx([expected[s]["loss"][0] for s in seeds])
    ratios = [expected[s]["mean_abs"][0] / expected[s]["mean_abs"][-1] for s in seeds]
    slopes = [fitted_slope(expected[s]["mean_abs"]) for s in seeds]
    assert result.ratios == pytest.approx(ratios, rel=1e-6)
    assert result.slopes == pytest.approx(slopes, rel=1e-6)
    assert result.ratio == pytest.approx(statistics.median(ratios), rel=1e-6)
    assert result.slope == pytest.approx(statistics.median(slopes), rel=1e-6)
    medians = result.layer_median()
    for i, name in enumerate(result.layers):
        values = [expected[s]["mean_abs"][i] for s in seeds]
        assert medians[name] == pytest.approx(statistics.median(values), rel=1e-6)


def test_steps_train_the_probed_copy_and_leave_the_model_and_random_state_alone() -> None:
    torch.manual_seed(3)
    model = HeadFirst()
    before = copy.deepcopy(model.state_dict())
    batch = vectors(0)
    adam = lambda params: torch.optim.Adam(params, lr=1e-2)  # noqa: E731
    rng = torch.get_rng_state()
    at_init = probe(model, batch)
    trained = probe(model, batch, steps=5, optimizer=adam)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert trained.steps == 5
    assert {r["step"] for r in trained.records} == {5}
    assert trained.losses[0] < at_init.losses[0] - 0.05  # the batch is being learnt
    # five Adam steps by hand, then the same pass
    net = copy.deepcopy(model)
    optimizer = adam(net.parameters())
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(net(batch[0]), batch[1]).backward()
        optimizer.step()
    expected = by_hand(net, batch)
    assert trained.per_seed()[0] == pytest.approx(expected["mean_abs"], rel=1e-5)
    assert trained.losses[0] == pytest.approx(expected["loss"][0], rel=1e-6)


def test_seeds_summarise_single_seed_probes() -> None:
    together = probe(HeadFirst, vectors, seeds=(0, 1, 2, 3))
    alone = [probe(HeadFirst, vectors, seeds=(seed,)) for seed in range(4)]
    assert together.records == [record for one in alone for record in one.records]
    ratios = [one.ratio for one in alone]
    slopes = [one.slope for one in alone]
    assert together.ratios == ratios
    assert together.slopes == slopes
    assert together.ratio == statistics.median(ratios)
    assert together.slope == statistics.median(slopes)
    assert (min(together.ratios), max(together.ratios)) == (min(ratios), max(ratios))
    with pytest.raises(ValueError, match="needs a function that builds the model"):
        probe(HeadFirst(), vectors, seeds=(0, 1))
    with pytest.raises(ValueError, match="seeds must differ"):
        probe(HeadFirst, vectors, seeds=(0, 0))
    with pytest.raises(ValueError, match="at least one seed"):
        probe(HeadFirst, vectors, seeds=())


def test_coursework_vgg38_at_initialisation_orders_as_the_reference() -> None:
    def ratios(**options: bool) -> ProbeResult:
        return probe(
            lambda: create_model("coursework_vgg", depth=38, **options),
            lambda seed: random_batch((3, 32, 32), 100, 16, seed),
            seeds=range(3),
            activations=False,
        )

    plain, bn = ratios(), ratios(batch_norm=True)
    rc, bn_rc = ratios(residual=True), ratios(batch_norm=True, residual=True)
    assert len(plain.layers) == 38
    # every seed, not only the median: plain << RC < 1 < BN+RC < BN
    assert max(plain.ratios) < 1e-10 < min(rc.ratios)
    assert max(rc.ratios) < 1 < min(bn_rc.ratios)
    assert max(bn_rc.ratios) < min(bn.ratios)
    assert min(bn.ratios) > 1e1
    assert 1e-3 < rc.ratio < 1e-1
    assert 1e2 < bn.ratio < 1e3
    assert 3 < bn_rc.ratio < 1e2
    # vanishing toward the input: positive slope; growing toward it: negative
    assert plain.slope > 5
    assert rc.slope > 0
    assert bn.slope < 0
    assert bn_rc.slope < 0


class ClassToken(nn.Module):
    """A ViT-style classifier: patch vectors, a class token, a learnt position embedding, a
    two-layer ``nn.TransformerEncoder``, the class token's output to a linear head."""

    def __init__(self, width: int = 16, tokens: int = 6) -> None:
        super().__init__()
        self.head = nn.Linear(width, CLASSES)  # registered first on purpose
        self.embed = nn.Linear(IN, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, width))
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], 1) + self.pos_embed
        return self.head(self.encoder(h)[:, 0])


class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 16)
        self.rnn = kind(16, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(torch.tanh(self.embed(x)))[0][:, -1])


def sequences(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, IN, generator=g), torch.randint(0, CLASSES, (4,), generator=g)


def test_a_transformer_with_a_class_token_in_data_flow_order() -> None:
    result = probe(ClassToken, sequences, seeds=(0, 1))
    flow = ["embed.weight"]
    for i in range(2):
        block = f"encoder.layers.{i}"
        flow += [f"{block}.{n}" for n in ("self_attn.in_proj_weight", "self_attn.out_proj.weight")]
        flow += [f"{block}.linear1.weight", f"{block}.linear2.weight"]
    assert result.layers == [*flow, "head.weight"]
    assert all(math.isfinite(v) and v > 0 for v in result.per_seed()[1])
    rms = result.layer_median("act_rms")
    assert math.isfinite(rms["embed.weight"])
    assert math.isfinite(rms["head.weight"])
    # the class token and position embedding are layers when asked for, before the encoder
    tokens = probe(ClassToken, sequences, include=("cls_token", "pos_embed"))
    where = {name: i for i, name in enumerate(tokens.layers)}
    assert max(where["cls_token"], where["pos_embed"]) < where[flow[1]]
    assert tokens.layers[-1] == "head.weight"


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_recurrent_classifiers(kind: type[nn.RNNBase]) -> None:
    result = probe(lambda: Recurrent(kind), sequences, seeds=(0, 1))
    recurrent = [f"rnn.weight_{m}_l{i}" for i in range(2) for m in ("ih", "hh")]
    assert result.layers[0] == "embed.weight"
    assert result.layers[-1] == "head.weight"
    assert sorted(result.layers[1:-1]) == sorted(recurrent)
    assert result.layers.index("rnn.weight_ih_l0") < result.layers.index("rnn.weight_ih_l1")
    assert all(math.isfinite(v) and v > 0 for v in result.per_seed()[0])
    assert result.layer_median("act_rms")["embed.weight"] > 0


def test_googlenet_aux_heads_are_off_the_main_path_and_weigh_0_3_in_the_loss() -> None:
    def build() -> nn.Module:
        # no dropout: the probe's pass and the hand-written one see the same network
        return create_model("googlenet", num_classes=10, stem="cifar", dropout=0.0, aux_dropout=0.0)

    batch = random_batch((3, 32, 32), 10, 2, seed=0)
    result = probe(build, batch)
    assert result.off_path
    assert all(name.startswith("aux") for name in result.off_path)
    assert not any(name.startswith("aux") for name in result.layers)
    assert result.layers[0].startswith("stem.")
    assert result.layers[-1] == "fc.weight"
    torch.manual_seed(0)
    with torch.no_grad():
        out = build().train()(batch[0])
    assert isinstance(out, AuxLogits)
    assert len(out.aux) == 2
    y = batch[1]
    main = F.cross_entropy(out.logits, y)
    aux = [F.cross_entropy(head, y) for head in out.aux]
    assert float(classification_loss(out, y)) == pytest.approx(float(main + 0.3 * sum(aux)))
    assert float(classification_loss(out, y, aux_weight=0)) == pytest.approx(float(main))
    assert result.losses[0] == pytest.approx(float(main + 0.3 * sum(aux)), rel=1e-5)


def test_the_figure_draws_each_models_medians_and_spread() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    from gradtrace.plots import plot_probe

    results = {
        "three layers": probe(HeadFirst, vectors, seeds=(0, 1, 2)),
        "transformer": probe(ClassToken, sequences, seeds=(0,)),
    }
    fig = plot_probe(results, title="t")
    top, bottom = fig.axes
    assert top.get_title() == "t"
    assert bottom.get_yscale() == "log" == top.get_yscale()
    for axes, stat in ((bottom, "mean_abs"), (top, "act_rms")):
        for line, result in zip(axes.lines, results.values()):
            medians = result.layer_median(stat)
            assert list(line.get_ydata()) == pytest.approx(
                [medians[n] for n in result.layers], nan_ok=True
            )
            assert list(line.get_xdata()) == pytest.approx(
                np.linspace(0, 1, len(result.layers)).tolist()
            )
    assert [line.get_color() for line in bottom.lines] == ["C0", "C1"]
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == list(results)
    # a band over the seeds for the three seeds' model only: its min and max per layer
    (band,) = [c for c in bottom.collections if isinstance(c, PolyCollection)]
    lows = [min(v) for v in zip(*results["three layers"].per_seed().values())]
    assert band.get_paths()[0].vertices[:, 1].min() == pytest.approx(min(lows))
    # drawn onto given axes: the gradient panel only
    ax = Figure().add_subplot()
    assert plot_probe(results, ax=ax) is ax.figure
    assert len(ax.figure.axes) == 1
    assert len(plot_probe(results, activations=False).axes) == 1
    with pytest.raises(ValueError, match="no probe results"):
        plot_probe({})
