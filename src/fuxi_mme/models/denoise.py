"""Noise decoupling before the blocks of FuXi-alpha and Fuxi-MME (docs/models.md#noise-decoupling).

Legend: B batch, N positions, W width, F = N + 1 frequencies of a 2N-point transform.

* :class:`FrequencyFilter` (after FMLP-Rec): x + causal_filter(x), the filter a learnable
  complex spectrum per channel. FMLP-Rec filters the whole sequence circularly, so position i
  would read later positions (the next items, the training targets); here the spectrum defines a
  kernel whose first ``max_len`` taps are kept and applied as a causal linear convolution
  (zero-padded to 2N), so position i reads positions <= i only, and padding (after the real
  positions) never reaches a real one.
* :class:`TokenGate` (after END4Rec): a keep weight w = sigmoid(MLP(x)) per event; x * w, and in
  training events with w below ``HARD_DROP`` are removed (x = 0). The mean keep weight over the
  real events, times ``model.denoise_weight``, is added to the loss (through ``aux_loss``), which
  pushes the weights of events that do not help down.

With ``model.denoise=none`` neither is built: the model is the published one.
"""

from __future__ import annotations

import torch
from torch import nn

HARD_DROP = 0.1  # gate: keep weights below this drop the event in training


class FrequencyFilter(nn.Module):
    """(B, N, W) -> (B, N, W): x plus a learnable causal filter of x applied in the frequency domain."""

    def __init__(self, width: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        # real and imaginary parts of the 2*max_len-point spectrum of each channel's kernel; small
        # at the start, so the layer starts near the identity
        self.spectrum = nn.Parameter(torch.randn(max_len + 1, width, 2) * 0.02)

    def kernel(self, n: int) -> torch.Tensor:
        """(n, W) the first n taps of each channel's kernel."""
        return torch.fft.irfft(torch.view_as_complex(self.spectrum), n=2 * self.max_len, dim=0)[:n]

    def forward(self, x_BNW: torch.Tensor, valid_BN: torch.Tensor) -> torch.Tensor:
        N = x_BNW.shape[1]
        x = x_BNW.float()
        size = 2 * N  # linear (not circular) convolution of two length-N signals
        y = torch.fft.irfft(torch.fft.rfft(x, n=size, dim=1) * torch.fft.rfft(self.kernel(N), n=size, dim=0), n=size, dim=1)[:, :N]
        return x_BNW + (y * valid_BN[..., None]).to(x_BNW.dtype)


class TokenGate(nn.Module):
    """(B, N, W) -> (B, N, W): each event scaled by its keep weight; the sparsity penalty of the
    forwards since the last :meth:`release` in :meth:`penalty`."""

    def __init__(self, width: int, weight: float):
        super().__init__()
        hidden = max(8, width // 2)
        last = nn.Linear(hidden, 1)
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, 3.0)  # keep weight about 0.95 at the start
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), last)
        self.weight = weight
        self._sums: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []

    def forward(self, x_BNW: torch.Tensor, valid_BN: torch.Tensor) -> torch.Tensor:
        w_BN = torch.sigmoid(self.net(x_BNW.float()))[..., 0]
        if self.training:
            w_BN = w_BN * (w_BN >= HARD_DROP)
            if torch.is_grad_enabled():
                v = valid_BN.to(w_BN.dtype)
                self._sums.append((w_BN * v).sum())
                self._counts.append(v.sum())
        return x_BNW * w_BN[..., None].to(x_BNW.dtype)

    def penalty(self) -> torch.Tensor | None:
        """``weight`` x the mean keep weight of the real events of the forwards since the last release."""
        if not self._sums or self.weight == 0:
            return None
        return self.weight * torch.stack(self._sums).sum() / torch.stack(self._counts).sum().clamp(min=1)

    def release(self) -> None:
        self._sums, self._counts = [], []


def make_denoise(kind: str, width: int, max_len: int, weight: float) -> nn.Module | None:
    """The module ``model.denoise`` asks for (None for ``none``)."""
    if kind == "none":
        return None
    if kind == "filter":
        return FrequencyFilter(width, max_len)
    if kind == "gate":
        return TokenGate(width, weight)
    raise ValueError(f"model.denoise={kind!r} is not one of none, filter, gate")


def denoise_penalty(module: nn.Module | None) -> torch.Tensor | None:
    return module.penalty() if isinstance(module, TokenGate) else None


def release_denoise(module: nn.Module | None) -> None:
    if isinstance(module, TokenGate):
        module.release()
