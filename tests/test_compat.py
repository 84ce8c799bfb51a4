"""``gradtrace.compat``: every private Lightning/torch attribute gradtrace reads, each pinned
against the installed versions, and none read anywhere else.

FSDP1's handle internals (``fsdp1_units``) and DeepSpeed's partitions
(``deepspeed_zero3_group``, ``deepspeed_zero12_fragment``) need process groups: the
multi-process tests pin them (FSDP1 hybrid and NO_SHARD, ZeRO 1/2/3 in
``test_stats.py``), whose values are wrong if either moves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import compat
from helpers.fits import quiet_trainer

SRC = Path(__file__).resolve().parents[1] / "src" / "gradtrace"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_accesses(source: str) -> list[str]:
    """Private attributes of objects other than ``self``/``cls``, private modules or names
    imported from other packages, and private names given to getattr/hasattr/setattr."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not on_self and not node.attr.startswith("_gradtrace"):  # our own tags
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("gradtrace"):
            parts = (node.module or "").split(".") + [alias.name for alias in node.names]
            if any(_private(part) for part in parts):
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and not node.args[1].value.startswith("_gradtrace")
        ):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_private_attributes_are_read_in_the_compat_module_only() -> None:
    offenders = {
        str(path.relative_to(SRC)): hits
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "compat.py" and (hits := private_accesses(path.read_text()))
    }
    assert offenders == {}


def test_the_scan_finds_each_kind_of_private_access() -> None:
    source = (
        "from torch.utils._pytree import tree_leaves\n"
        "from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling\n"
        "step = trainer.fit_loop.epoch_loop._batches_that_stepped\n"
        "flat = getattr(param, '_fsdp_flattened', False)\n"
        "self._mine = 1\n"
        "ax._gradtrace_layers = []\n"
    )
    assert [hit.split(":")[0] for hit in private_accesses(source)] == ["1", "2", "3", "4"]


class _Watch(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(
            (batch_idx, compat.batches_that_stepped(trainer), compat.should_update_logs(trainer))
        )


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_step_counter_and_logging_rule(tmp_path: Path) -> None:
    """One optimizer, no accumulation: the counter is the batch index before the batch ends
    (read in on_train_batch_end, before Lightning increments it), and the loggers write on
    every second batch with log_every_n_steps=2."""
    watch = _Watch()
    module = _Tiny()
    assert compat.attached_trainer(module) is None
    trainer = quiet_trainer(tmp_path, [watch], max_steps=5, log_every_n_steps=2)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(15, 4, generator=g), torch.randint(0, 2, (15,), generator=g))
    trainer.fit(module, DataLoader(data, batch_size=3))
    assert compat.attached_trainer(module) is trainer
    assert watch.seen == [(i, i, (i + 1) % 2 == 0) for i in range(5)]


def test_lightning_knows_which_optimizers_unscale_themselves() -> None:
    params = [nn.Parameter(torch.ones(3))]
    assert compat.optimizer_handles_unscaling(torch.optim.Adam(params, fused=True))
    assert not compat.optimizer_handles_unscaling(torch.optim.SGD(params, lr=0.1))


def test_lightning_cli_reads_a_value_under_the_subcommand() -> None:
    from jsonargparse import Namespace
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI.__new__(LightningCLI)  # the lookup needs no parser
    cli.subcommand = "fit"
    config = Namespace(fit=Namespace(trainer=Namespace(max_steps=7)))
    assert compat.lightning_cli_config_value(cli, config, "trainer").max_steps == 7
    assert compat.lightning_cli_config_value(cli, config, "model", {}) == {}


def test_a_lightning_cli_subcommand_option_gets_new_help() -> None:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class HelpSet(Exception):
        pass

    class CLI(LightningCLI):
        def setup_parser(self, *args: object) -> None:
            super().setup_parser(*args)
            compat.set_subcommand_option_help(self, "ckpt_path", {"fit": "resume from here"})
            raise HelpSet(self)

    with pytest.raises(HelpSet) as info:
        CLI(LightningModule, LightningDataModule, args=["fit"])
    cli = info.value.args[0]
    assert cli._subcommand_parsers["fit"].format_help().count("resume from here") == 1
    assert "resume from here" not in cli._subcommand_parsers["test"].format_help()


def test_own_parameters_and_children_keep_repeats_and_empty_slots() -> None:
    shared = nn.Parameter(torch.ones(2))
    child = nn.Linear(2, 2)
    module = nn.Module()
    module.a = shared
    module.b = shared
    module.register_parameter("none", None)
    module.first = child
    module.second = child
    module.register_module("empty", None)
    assert [(n, p is shared) for n, p in compat.own_parameters(module) if p is not None] == [
        ("a", True),
        ("b", True),
    ]
    assert [n for n, _ in compat.own_parameters(module)] == ["a", "b", "none"]
    assert [n for n, _ in compat.own_children(module)] == ["first", "second", "empty"]


def test_compiled_modules_are_recognised_without_compiling() -> None:
    eager = nn.Linear(2, 2)
    assert not compat.is_compiled_module(eager)
    assert compat.is_compiled_module(torch.compile(nn.Linear(2, 2)))  # the wrapper
    in_place = nn.Linear(2, 2)
    in_place.compile()
    assert compat.is_compiled_module(in_place)


def test_foreach_operations_equal_one_tensor_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    b = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    for ord in (1.0, 2.0, float("inf")):
        expected = [torch.linalg.vector_norm(t, ord) for t in a]
        torch.testing.assert_close(compat.foreach_norm(a, ord), expected)
    as_double = compat.foreach_norm(a, 2.0, dtype=torch.float64)
    assert [t.dtype for t in as_double] == [torch.float64, torch.float64]
    copies = compat.foreach_copy(a)
    assert all(c.data_ptr() != t.data_ptr() and torch.equal(c, t) for c, t in zip(copies, a))
    expected = [x - y for x, y in zip(a, b)]
    compat.foreach_sub_(a, b)
    torch.testing.assert_close(a, expected)


def test_loss_scale_tensor_is_the_scalers_scale() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale tensor exists once something is scaled
    scale = compat.loss_scale_tensor(scaler)
    assert isinstance(scale, torch.Tensor)
    assert scale.item() == scaler.get_scale() == 1024.0


def test_tree_leaves_flattens_nested_containers() -> None:
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert compat.tree_leaves({"x": [a, (b,)], "y": c}) == [a, b, c]


def test_module_base_classes() -> None:
    for conv in (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.LazyConv3d):
        assert issubclass(conv, compat.CONV_BASE)
    for norm in (nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d):
        assert issubclass(norm, compat.NORM_BASE)
    assert not issubclass(nn.LayerNorm, compat.NORM_BASE)


@pytest.mark.parametrize("size", [(3, 3), (1, 1)])
def test_aten_ops_the_flop_counter_adds(size: tuple[int, int]) -> None:
    """``adaptive_avg_pool2d`` reaches the private op (a 1x1 output may take a mean instead);
    the CPU attention kernel is the op ``scaled_dot_product_attention`` runs on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    seen: set = set()
    formulas = {compat.ATEN_ADAPTIVE_AVG_POOL2D: lambda *a, **k: seen.add("pool") or 0}
    formulas[compat.ATEN_CPU_ATTENTION] = lambda *a, **k: seen.add("attention") or 0
    with FlopCounterMode(display=False, custom_mapping=formulas):
        F.adaptive_avg_pool2d(torch.ones(1, 2, 6, 6), size)
        q = torch.ones(1, 2, 4, 8)
        F.scaled_dot_product_attention(q, q, q)
    assert "attention" in seen
    if size != (1, 1):
        assert "pool" in seen
