"""The prompt flow: Gaussian encoders followed by K planar flows.

Three distributions over prompt offsets (dimension D):
- the image-specific one (``ImageSpecificFlow``, checkpoint name ``PFL_context``): mean,
  variance and flow parameters computed from the global image feature;
- two image-agnostic ones (``ImageAgnosticFlow``, ``PFL_normal`` / ``PFL_abnormal``): a learned
  state fed to an encoder that both share, and free flow parameters.

The encoder's second head gives h, and the variance is exp(0.5 h) (standard deviation
exp(0.25 h)), as in the official release. Decoders and ``p_mu`` take part in no loss; they exist
so that checkpoints keep the official keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class MLP(nn.Module):
    """Linear - Softplus - Linear - Softplus - Linear (keys ``module.{0,2,4}``)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.module = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Softplus(),
                                    nn.Linear(d_hidden, d_hidden), nn.Softplus(),
                                    nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class GaussianEncoder(nn.Module):
    """x -> (mean, h); the variance is exp(0.5 h)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.weight_mean = MLP(dim, hidden, dim)
        self.weight_log_variance = MLP(dim, hidden, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight_mean(x), self.weight_log_variance(x)


class Decoder(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.weight_mean = MLP(dim, hidden, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.weight_mean(z)


def planar_flows(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """K planar flows z <- z + u_k tanh(w_k . z + b_k).

    z [..., D]; u, w [..., K, D]; b [..., K] (broadcast against z's leading dims).
    Returns z_K and the per-flow log-determinants [..., K]:
    log(|1 + (w_k (1 - tanh^2(w_k . z + b_k))) . u_k| + 1e-5)."""
    log_dets = []
    for k in range(u.shape[-2]):
        uk, wk, bk = u[..., k, :], w[..., k, :], b[..., k]
        a = torch.tanh((wk * z).sum(-1) + bk)                  # [...]
        psi_u = (1 - a ** 2) * (wk * uk).sum(-1)               # [...]
        log_dets.append(torch.log(torch.abs(1 + psi_u) + 1e-5))
        z = z + uk * a.unsqueeze(-1)
    return z, torch.stack(log_dets, dim=-1)


@dataclass
class FlowSamples:
    """Samples of one distribution. Leading dims [R, rows]."""
    z0: torch.Tensor          # base Gaussian draw
    zk: torch.Tensor          # after the K flows: the prompt offsets
    log_det: torch.Tensor     # [R, rows], summed over flows
    mean: torch.Tensor        # [rows, D]
    h: torch.Tensor           # [rows, D]; variance exp(0.5 h)


def _draw(mean: torch.Tensor, h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return mean + torch.sqrt(torch.exp(0.5 * h)) * eps


class ImageSpecificFlow(nn.Module):
    """Image-specific distribution: encoder and flow parameters from the image feature."""

    def __init__(self, encoder: GaussianEncoder, decoder: Decoder, dim: int, num_flows: int):
        super().__init__()
        self.num_flows = num_flows
        self.encoder = encoder
        self.decoder = decoder
        self.p_mu = nn.Sequential(nn.Linear(dim, dim))
        self.amor_u = nn.Linear(dim, num_flows * dim)
        self.amor_w = nn.Linear(dim, num_flows * dim)
        self.amor_b = nn.Linear(dim, num_flows)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> FlowSamples:
        """x [B, D] image features, eps [R, B, D] -> samples [R, B, D]."""
        b, d = x.shape
        mean, h = self.encoder(x)
        u = self.amor_u(x).view(b, self.num_flows, d)          # flow k: outputs k*D..(k+1)*D-1
        w = self.amor_w(x).view(b, self.num_flows, d)
        bias = self.amor_b(x)                                   # [B, K]
        z0 = _draw(mean, h, eps)                                # [R, B, D]
        zk, log_det = planar_flows(z0, u, w, bias)
        return FlowSamples(z0, zk, log_det.sum(-1), mean, h)


class ImageAgnosticFlow(nn.Module):
    """Image-agnostic distribution: a learned state through the shared encoder, free flows."""

    def __init__(self, encoder: GaussianEncoder, decoder: Decoder, dim: int, num_flows: int):
        super().__init__()
        self.amor_u = nn.Parameter(torch.randn(1, num_flows, dim, 1))
        self.amor_w = nn.Parameter(torch.randn(1, num_flows, 1, dim))
        self.amor_b = nn.Parameter(torch.randn(1, num_flows, 1, 1))
        self.state = nn.Parameter(torch.randn(1, dim))
        self.encoder = encoder
        self.decoder = decoder
        self.p_mu = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, eps: torch.Tensor) -> FlowSamples:
        """eps [R, 1, D] -> samples [R, 1, D] (the input image plays no part)."""
        mean, h = self.encoder(self.state)                     # [1, D]
        u = self.amor_u[..., 0]                                 # [1, K, D]
        w = self.amor_w[:, :, 0, :]                             # [1, K, D]
        bias = self.amor_b[:, :, 0, 0]                          # [1, K]
        z0 = _draw(mean, h, eps)
        zk, log_det = planar_flows(z0, u, w, bias)
        return FlowSamples(z0, zk, log_det.sum(-1), mean, h)


def kl_term(s: FlowSamples, batch_size: int) -> torch.Tensor:
    """The official KL estimate of one distribution for a batch of ``batch_size`` images:

        (sum over the B images of [log q(z0) - log N(zK; 0, I)] - sum of the log-dets) / B

    Log densities without the 2 pi constant, each with 1e-8 added (which cancels), as the
    official code. The image-specific distribution has one row per image. An image-agnostic
    distribution has one row shared by the batch: the official code broadcasts its density
    term over the B images (so it counts B times before the division by B) while its single
    log-det is divided by B, i.e. [log q(z0) - log N(zK; 0, I)] - log_det / B."""
    var = torch.exp(0.5 * s.h)
    log_q = (-0.5 * (torch.log(var) + (s.z0 - s.mean) ** 2 / var)).sum(-1) + 1e-8  # [R, rows]
    log_p = (-0.5 * s.zk ** 2).sum(-1) + 1e-8                                      # [R, rows]
    density = (log_q - log_p).expand(*log_q.shape[:-1], batch_size)               # [R, B]
    return (density.sum() - s.log_det.sum()) / batch_size
