"""method=probe: a linear probe, i.e. only the new head is trained on frozen pre-trained features."""

from __future__ import annotations

from torch import nn

from lqf_exp.methods.base import GradientMethod


def head_of(net: nn.Module) -> nn.Linear:
    """The classification head; every network lqf_exp builds names it ``fc``."""
    head = getattr(net, "fc", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(net).__name__} has no nn.Linear head named 'fc'; probe and LQF need one")
    return head


class Probe(GradientMethod):
    """Backbone frozen and kept in eval mode (BN statistics frozen); the head is the only trained layer."""

    method_name = "probe"

    def configure_trainable(self) -> None:
        self.net.requires_grad_(False)
        head_of(self.net).requires_grad_(True)
        self.net.eval()

    def train(self, mode: bool = True) -> Probe:
        # Lightning calls .train() at every epoch; the frozen backbone must keep its running statistics.
        super().train(mode)
        self.net.eval()
        return self
