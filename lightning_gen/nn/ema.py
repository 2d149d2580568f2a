"""Exponential moving average of a network's weights (Polyak averaging).

Used by the families that sample from averaged weights (GAN generators, diffusion and flow
matching networks, the autoregressive networks).
The averaged copy is an ``nn.Module`` attribute of the LightningModule, so it moves with
``.to(device)``, is saved in checkpoints and is restored by ``load_from_checkpoint``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ExponentialMovingAverage(nn.Module):
    """``ema = decay * ema + (1 - decay) * weights`` after each optimizer step.

    Args:
        network: the network to average; a frozen deep copy is kept.
        decay: the averaging rate per update, in [0, 1).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` so the average forgets the
            random initialization quickly early in training (as in TensorFlow's
            ExponentialMovingAverage with num_updates).
    """

    def __init__(self, network: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.averaged = copy.deepcopy(network).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # num_updates (saved in checkpoints) counted on the host as well, so that the decay is a
        # Python number: computing it on the device cost five tensor operations per update, and
        # reading the buffer would wait for the device. Set again when a state dict is loaded.
        self._updates = 0
        self._pairs: tuple | None = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self._updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def _tensor_lists(self, network: nn.Module) -> tuple:
        """(network, averaged parameters, network parameters, averaged buffers, network
        buffers), kept between updates: walking a network's modules for its tensors costs more
        than the update itself (a U-Net's 146 parameters). Parameters keep their identity when
        a module moves (``.to``) or loads a state dict, as the optimizer, which holds them too,
        relies on; the lists are rebuilt when this module moves or loads (``_apply``,
        ``_load_from_state_dict``) or another network is given."""
        pairs = self._pairs
        if pairs is None or pairs[0] is not network:
            averaged = list(self.averaged.parameters())
            current = list(network.parameters())
            if len(averaged) != len(current):
                raise ValueError("the network's parameters do not match the averaged copy's")
            same_dtypes = all(a.dtype == c.dtype for a, c in zip(averaged, current))
            averaged_buffers, buffers = list(self.averaged.buffers()), list(network.buffers())
            count = min(len(averaged_buffers), len(buffers))
            pairs = self._pairs = (network, averaged, current, same_dtypes, averaged_buffers[:count],
                                   buffers[:count])
        return pairs

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        # One fused call per list (the same lerp_ per tensor as a loop over them, without
        # Python's cost per tensor), its weight one number for all of them.
        weight = 1.0 - self.current_decay()
        _, averaged, current, same_dtypes, averaged_buffers, buffers = self._tensor_lists(network)
        if not same_dtypes:
            current = [value.to(average.dtype) for average, value in zip(averaged, current)]
        torch._foreach_lerp_(averaged, current, weight)
        if averaged_buffers:
            torch._foreach_copy_(averaged_buffers, buffers)
        self.num_updates.add_(1)  # in place: += would re-register the buffer (nn.Module.__setattr__)
        self._updates += 1

    def _apply(self, *args, **kwargs):
        self._pairs = None
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._pairs = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "num_updates" in state_dict:
            self._updates = int(state_dict[prefix + "num_updates"])

    def train(self, mode: bool = True) -> "ExponentialMovingAverage":
        # The averaged copy is only ever evaluated (dropout off, norm statistics frozen).
        super().train(mode)
        self.averaged.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.averaged(*args, **kwargs)


def select_network(network: nn.Module, ema: ExponentialMovingAverage | None,
                   use_ema: bool | None = None) -> nn.Module:
    """The network to sample with: the average when there is one (``use_ema=None``), or as asked."""
    if use_ema is None:
        use_ema = ema is not None
    if use_ema and ema is None:
        raise ValueError("use_ema=True needs a model trained with ema_decay set")
    return ema.averaged if use_ema else network
