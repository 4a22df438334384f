"""TLC's neuron model: each channel's pre-activation as a Gaussian N(mu, sigma^2) (docs/methods.md, TLC).

For a site right after a BatchNorm, (sigma, mu) = (gamma, beta), the BN's affine parameters (the "BN
lens"); otherwise the measured per-channel mean and standard deviation of the pre-activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tlc.criteria.entropy import channel_entropy as state_entropy
from tlc.graph import Graph, Site
from tlc.ops import Kind


@dataclass(frozen=True)
class SiteModel:
    """Per-channel Gaussian of a site's pre-activation and what TLC derives from it."""

    site: str
    mu: torch.Tensor
    sigma: torch.Tensor
    source: str  # "bn" or "measured"

    @property
    def mask(self) -> torch.Tensor:
        """1 where the channel is linearized (mostly ON, mu > 0), 0 where it is removed (mu <= 0)."""
        return channel_split(self.mu)

    @property
    def error_likelihood(self) -> torch.Tensor:
        return error_likelihood(self.mu, self.sigma)

    @property
    def off_probability(self) -> torch.Tensor:
        return off_probability(self.mu, self.sigma)

    @property
    def entropy(self) -> torch.Tensor:
        return state_entropy(1.0 - self.off_probability)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def channel_split(mu: torch.Tensor) -> torch.Tensor:
    """TLC's sign split: 1 (linearize) where mu > 0, 0 (remove) where mu <= 0."""
    return (mu > 0).to(torch.float32)


def off_probability(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """P(pre-activation <= 0) = Phi(-mu / |sigma|); the indicator [mu <= 0] when sigma = 0."""
    mu, sigma = mu.double(), sigma.double().abs()
    p = _phi(-mu / sigma.clamp_min(1e-30))
    return torch.where(sigma > 0, p, (mu <= 0).double())


def error_likelihood(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Probability that collapsing the channel to its majority state is wrong: Phi(-|mu| / |sigma|)."""
    mu, sigma = mu.double().abs(), sigma.double().abs()
    p = _phi(-mu / sigma.clamp_min(1e-30))
    return torch.where(sigma > 0, p, torch.zeros_like(p))


def bn_lens(graph: Graph, site: Site) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gamma, beta) of the batch norm whose output the site reads, if it reads one directly."""
    node = graph.producer_through_identity(graph.info[graph.site_node(site)].input)
    info = graph.info[node]
    if info.kind is not Kind.BN or "mean" not in info.params:
        return None
    n = info.params["mean"].numel()
    gamma = info.params["weight"] if info.params["weight"] is not None else torch.ones(n)
    beta = info.params["bias"] if info.params["bias"] is not None else torch.zeros(n)
    return gamma.detach().double().cpu(), beta.detach().double().cpu()


def site_models(graph: Graph, sites: list[Site], measured: dict | None = None) -> dict[str, SiteModel]:
    """The Gaussian model of each site: BN lens where possible, measured statistics otherwise."""
    models = {}
    for site in sites:
        lens = bn_lens(graph, site)
        if lens is not None:
            gamma, beta = lens
            models[site.name] = SiteModel(site.name, beta, gamma.abs(), "bn")
        elif measured is not None and site.name in measured:
            stats = measured[site.name]
            models[site.name] = SiteModel(site.name, stats.mean, stats.std, "measured")
        else:
            raise KeyError(f"site {site.name} has no batch norm in front of it: measure its statistics first")
    return models


def needs_measurement(graph: Graph, sites: list[Site]) -> list[Site]:
    """Sites whose Gaussian model must come from measured pre-activations (no BN in front)."""
    return [s for s in sites if bn_lens(graph, s) is None]
