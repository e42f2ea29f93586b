"""Two gloo processes with half the data each hold the factors of one process on all of it (sum + count
all-reduce), and precondition a gradient identically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lqf_exp.precond import FactorAccumulator, KroneckerInverse, precondition_layer

from .helpers.losses import make_loss
from .helpers.runtime import free_port

DT = torch.float64
LAYERS = {"0": True, "2": False, "5": True}


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, bias=False),
                         nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).to(DT)


def batches() -> list[tuple[Tensor, Tensor]]:
    """Four batches of uneven sizes: rank r gets batches r and r + 2."""
    torch.manual_seed(1)
    return [(torch.randn(n, 2, 6, 6, dtype=DT), torch.randint(0, 3, (n,))) for n in (3, 5, 2, 4)]


def factors_and_grads(shard: list[tuple[Tensor, Tensor]]) -> dict[str, object]:
    net = cnn()
    acc = FactorAccumulator(net, LAYERS, make_loss("ce"))
    for x, y in shard:
        acc.accumulate(x, y)
    acc.all_reduce()
    factors = acc.finalize()
    torch.manual_seed(2)  # the same (already averaged, as under DDP) gradient on every rank
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    for name, (A, G) in factors.items():
        layer = net.get_submodule(name)
        precondition_layer(KroneckerInverse(A, G, 1e-3), layer.weight, layer.bias if LAYERS[name] else None)
    return {"factors": factors, "grads": [p.grad for p in net.parameters()], "count": acc.count}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = batches()[rank::world]
        torch.save(factors_and_grads(shard), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_factors_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = factors_and_grads(batches())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in ranks:
        assert res["count"] == single["count"] == 14
        for name, (A, G) in single["factors"].items():
            torch.testing.assert_close(res["factors"][name][0], A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(res["factors"][name][1], G, rtol=1e-12, atol=1e-14)
        for g, ref in zip(res["grads"], single["grads"], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    for g0, g1 in zip(ranks[0]["grads"], ranks[1]["grads"], strict=True):
        assert torch.equal(g0, g1)
