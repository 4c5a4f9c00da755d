"""The trigger generator G (one per candidate class, stacked) and the MINE statistics network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, rng
from .layers import StackedBatchNorm, StackedLinear


class TriggerGenerator(nn.Module):
    """G: z ~ U[0,1]^latent -> trigger values in [0,1], for K classes at once.

    Four linear layers with BatchNorm + LeakyReLU(0.2); z is split into four chunks, one fed
    into each layer (the skip connections of the MESA generator). z [K, N, latent] -> [K, N, out];
    ``offset`` [K, out] shifts each class's output logits (its learned mean pattern).
    """

    def __init__(self, stacks: int, latent_dim: int, hidden: int, out_features: int) -> None:
        super().__init__()
        chunk = latent_dim // 4
        self.chunks = [chunk, chunk, chunk, latent_dim - 3 * chunk]
        widths = [self.chunks[0], hidden + self.chunks[1], hidden + self.chunks[2], hidden + self.chunks[3]]
        self.linears = nn.ModuleList(
            StackedLinear(stacks, w, out) for w, out in zip(widths, [hidden, hidden, hidden, out_features], strict=True)
        )
        self.norms = nn.ModuleList(StackedBatchNorm(stacks, hidden) for _ in range(3))

    def forward(self, z: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        parts = torch.split(z, self.chunks, dim=-1)
        h = F.leaky_relu(self.norms[0](self.linears[0](parts[0])), 0.2)
        for i in (1, 2):
            h = F.leaky_relu(self.norms[i](self.linears[i](torch.cat([h, parts[i]], -1))), 0.2)
        logits = self.linears[3](torch.cat([h, parts[3]], -1))
        return torch.sigmoid(logits if offset is None else logits + offset.unsqueeze(1))


class StatisticsNetwork(nn.Module):
    """MINE's T(z, g) for K classes: [K, N, latent] x [K, N, out] -> [K, N]."""

    def __init__(self, stacks: int, latent_dim: int, out_features: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                StackedLinear(stacks, latent_dim + out_features, hidden),
                StackedLinear(stacks, hidden, hidden),
                StackedLinear(stacks, hidden, 1),
            ]
        )

    def forward(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, g], -1)
        for layer in self.layers[:-1]:
            h = F.elu(layer(h))
        return self.layers[-1](h).squeeze(-1)


def mine_estimate(
    stats: StatisticsNetwork, z: torch.Tensor, g: torch.Tensor, moving_avg: torch.Tensor, rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual information I(z; G(z)) per class with MINE (Donsker-Varadhan bound).

    Returns (surrogate, bound), both [K]. ``surrogate`` has MINE's bias-corrected gradient: the
    denominator E[exp T'] is replaced by its moving average (updated in place, rate ``rate``);
    ``bound`` is the plain DV estimate, for reporting. Maximising the surrogate trains T (tighter
    bound) and G (more entropy) alike, so both are updated from one backward pass.
    """
    n = z.shape[1]
    t_joint = stats(z, g)
    shuffled = torch.randperm(n, device=z.device, generator=rng.generator(z.device))
    t_marginal = stats(z[:, shuffled], g)  # break the (z, g) pairing
    log_mean_exp = torch.logsumexp(t_marginal, 1) - torch.log(torch.tensor(float(n), device=z.device))
    mean_exp = log_mean_exp.exp()
    with torch.no_grad():
        fresh = ~torch.isfinite(moving_avg) | (moving_avg <= 0)
        ops.moving_average_(moving_avg, mean_exp, rate)
        moving_avg.copy_(torch.where(fresh, mean_exp, moving_avg))  # a class's first value starts it
    bound = t_joint.mean(1) - log_mean_exp
    surrogate = t_joint.mean(1) - mean_exp / moving_avg.detach()
    return surrogate, bound.detach()
