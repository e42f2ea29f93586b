"""KFACPreconditioner inside a real Trainer: the optimizer sees preconditioned gradients, constant curvature is
computed once at w0, non-constant curvature is refreshed, and the factors survive a state_dict round trip."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lqf_exp.curvature import CurvatureTargets
from lqf_exp.precond import FactorAccumulator, KFACPreconditioner

from .helpers.losses import make_loss

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class SpySGD(torch.optim.SGD):
    """Records the gradients the update actually uses (after Lightning's closure ran the hooks)."""

    def __init__(self, params, seen: list[list[Tensor]], **kw) -> None:
        super().__init__(params, **kw)
        self.seen = seen

    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        super().step()
        return loss


class ToyModule(pl.LightningModule):
    def __init__(self, constant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.loss_fn, self.constant = make_loss("mse", 2.0), constant
        self.raw: list[list[Tensor]] = []
        self.seen: list[list[Tensor]] = []

    def curvature_targets(self) -> CurvatureTargets:
        # layer "2"'s bias is trainable but not a target: it must keep its plain gradient
        layers = {"0": (self.net[0].weight, self.net[0].bias), "2": (self.net[2].weight, None)}
        # damping_offset: the method's weight decay toward w0, added to the K-FAC damping
        return CurvatureTargets(network=self.net, layers=layers, loss=self.loss_fn, constant=self.constant,
                                damping_offset=0.01)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.loss_fn(self.net(batch[0]), batch[1])

    def on_after_backward(self) -> None:
        self.raw.append([p.grad.clone() for p in self.parameters()])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SpySGD(self.parameters(), self.seen, lr=0.05)


class ToyData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.ds = TensorDataset(torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=8, shuffle=False)


def fit(module: ToyModule, cb: KFACPreconditioner, steps: int) -> None:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(module, datamodule=ToyData())


def factors_at_w0(module: ToyModule, num_batches: int) -> dict[str, tuple[Tensor, Tensor]]:
    acc = FactorAccumulator(module.net, {"0": True, "2": False}, make_loss("mse", 2.0))
    for _, (x, y) in zip(range(num_batches), ToyData().train_dataloader(), strict=False):
        acc.accumulate(x, y)
    return acc.finalize(dtype=torch.float32)


def test_constant_curvature_preconditions_every_step_with_w0_factors() -> None:
    module = ToyModule(constant=True)
    expected_factors = factors_at_w0(module, num_batches=2)
    cb = KFACPreconditioner(num_batches=2, damping=1e-3, update_every=1)
    fit(module, cb, steps=3)
    assert cb.num_updates == 1 and cb.steps == 3 and cb.stats["samples"] == 16 and cb.stats["seconds"] > 0
    assert all(inv.damping == pytest.approx(1e-3 + 0.01) for inv in cb.inverses.values())
    for name, (A, G) in expected_factors.items():  # unchanged by 3 steps that moved the weights
        torch.testing.assert_close(cb.factors[name][0], A)
        torch.testing.assert_close(cb.factors[name][1], G)
    assert len(module.seen) == len(module.raw) == 3
    w0, b0, w2, b2 = range(4)
    for raw, seen in zip(module.raw, module.seen, strict=True):
        V0 = torch.cat([raw[w0], raw[b0][:, None]], dim=1)
        P0 = cb.inverses["0"].apply(V0)
        torch.testing.assert_close(seen[w0], P0[:, :-1])
        torch.testing.assert_close(seen[b0], P0[:, -1])
        torch.testing.assert_close(seen[w2], cb.inverses["2"].apply(raw[w2]))
        torch.testing.assert_close(seen[b2], raw[b2])  # not a target: plain gradient
        assert not torch.allclose(seen[w0], raw[w0])


def test_non_constant_curvature_is_refreshed() -> None:
    module = ToyModule(constant=False)
    w0_factors = factors_at_w0(module, num_batches=2)
    cb = KFACPreconditioner(num_batches=2, update_every=2)
    fit(module, cb, steps=5)
    assert cb.num_updates == 3  # at fit start, then before steps 2 and 4
    assert not torch.allclose(cb.factors["0"][1], w0_factors["0"][1])
    raw, seen = module.raw[4], module.seen[4]  # step 4 used the latest factors
    torch.testing.assert_close(seen[2], cb.inverses["2"].apply(raw[2]))


def test_state_dict_round_trip_skips_recomputation() -> None:
    module = ToyModule(constant=True)
    cb = KFACPreconditioner(num_batches=2)
    fit(module, cb, steps=1)
    restored = KFACPreconditioner(num_batches=2)
    restored.load_state_dict(cb.state_dict())
    fit(ToyModule(constant=True), restored, steps=2)
    assert restored.num_updates == 1 and restored.steps == 3
    assert restored.stats == cb.stats  # the stats of the original computation: nothing was recomputed
    for name, (A, G) in cb.factors.items():
        torch.testing.assert_close(restored.factors[name][0], A)
        torch.testing.assert_close(restored.factors[name][1], G)


def test_batches_are_sharded_across_ranks() -> None:
    cb = KFACPreconditioner(num_batches=5)
    firsts = []
    for rank in range(2):
        trainer = SimpleNamespace(datamodule=ToyData(), world_size=2, global_rank=rank)
        firsts.append([b[0][0, 0].item() for b in cb._local_batches(trainer)])  # type: ignore[arg-type]
    all_firsts = [b[0][0, 0].item() for _, b in zip(range(5), ToyData().train_dataloader(), strict=False)]
    assert firsts[0] == all_firsts[0::2] and firsts[1] == all_firsts[1::2]


def test_bad_config_and_loss_raise() -> None:
    with pytest.raises(ValueError, match="fisher_type"):
        KFACPreconditioner(fisher_type="ef")
    with pytest.raises(ValueError, match="update_every"):
        KFACPreconditioner(update_every=0)
    module = ToyModule(constant=True)
    module.loss_fn = nn.MSELoss()  # not a ClassificationLoss: its output-space curvature would be unknown
    with pytest.raises(TypeError, match="ClassificationLoss"):
        fit(module, KFACPreconditioner(num_batches=1), steps=1)


def test_save_factors_false_recomputes_on_resume() -> None:
    module = ToyModule(constant=True)
    cb = KFACPreconditioner(num_batches=2, save_factors=False)
    fit(module, cb, steps=1)
    state = cb.state_dict()
    assert state["factors"] is None and state["steps"] == 1
    restored = KFACPreconditioner(num_batches=2, save_factors=False)
    restored.load_state_dict(state)
    fresh = ToyModule(constant=True)
    expected = factors_at_w0(fresh, num_batches=2)
    fit(fresh, restored, steps=2)
    assert restored.num_updates == 2 and restored.steps == 3  # recomputed once, at the resumed fit start
    for name, (A, G) in expected.items():
        torch.testing.assert_close(restored.factors[name][0], A)
        torch.testing.assert_close(restored.factors[name][1], G)
