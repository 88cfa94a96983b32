"""Weight-sharing supernets for the differentiable strategies (DARTS, DASS).

A `Supernet` holds one vector of architecture logits per searched choice (softmax-able),
separates them from the weights (which include learned mask scores), and `derive()`s a valid
arch for `Space.build` by argmax. The mixed ops blend candidates with softmax weights; the
sparse candidates are DASS's parametric sparse op: a straight-through top-k of learned scores
at the candidate's sparsity (`search_spaces.ops.score_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.ops import score_mask

__all__ = ["MixedKernelDepthwise", "MixedSparsityConv2d", "Supernet"]


class Supernet(nn.Module):
    """Base of the supernets: architecture logits by choice name, weights, and `derive`."""

    def __init__(self) -> None:
        nn.Module.__init__(self)  # not super(): a subclass may mix in a network class
        self.alphas = nn.ParameterList()
        self.arch_names: list[str] = []
        self.arch_candidates: dict[str, tuple] = {}

    def add_choice(self, name: str, candidates: Sequence[Any]) -> nn.Parameter:
        """Register a searched choice; returns its logits (small random values, seeded by
        torch's global RNG, so that argmax ties break reproducibly)."""
        alpha = nn.Parameter(1e-3 * torch.randn(len(candidates)))
        self.alphas.append(alpha)
        self.arch_names.append(name)
        self.arch_candidates[name] = tuple(candidates)
        return alpha

    def named_arch_parameters(self) -> dict[str, nn.Parameter]:
        """Choice name -> its logits, in registration order."""
        return dict(zip(self.arch_names, self.alphas, strict=True))

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture logits, one vector per searched choice."""
        return list(self.alphas)

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other trainable parameter (weights, biases, batch norm, mask scores)."""
        arch = {id(p) for p in self.alphas}
        return [p for p in self.parameters() if id(p) not in arch]

    def probabilities(self) -> dict[str, list[float]]:
        """Softmax of each choice's logits, by choice name (for logs and reports)."""
        return {
            name: torch.softmax(alpha.detach(), dim=0).tolist()
            for name, alpha in self.named_arch_parameters().items()
        }

    def best(self, name: str) -> Any:
        """The candidate of choice `name` with the largest logit."""
        alpha = self.named_arch_parameters()[name]
        return self.arch_candidates[name][int(torch.argmax(alpha.detach()))]

    def derive(self) -> dict[str, Any]:
        """The arch of argmax choices, valid for the space's `build`."""
        raise NotImplementedError


class MixedSparsityConv2d(nn.Conv2d):
    """A conv mixed over {dense, sparse@s1, sparse@s2, ...}, sharing one weight and one set of
    learned scores: the weight is multiplied by sum_i p_i * topk_mask(scores, s_i), so the
    mixture costs one convolution. Sparsity 0.0 in `sparsities` is the dense candidate."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        alpha: nn.Parameter,
        sparsities: Sequence[float],
        *,
        pattern: str = "block",
        block: tuple[int, int] | None = (4, 1),
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias
        )
        if len(sparsities) != alpha.numel():
            raise ValueError(f"{len(sparsities)} sparsities but {alpha.numel()} logits")
        self.sparsities = tuple(float(s) for s in sparsities)
        self.pattern = pattern
        self.block = block if pattern == "block" else None
        self.scores = nn.Parameter(self.weight.detach().abs().clone())
        self._alpha = [alpha]  # a list, so the supernet (not this layer) owns the logits

    def mixed_mask(self) -> torch.Tensor:
        """sum_i softmax(alpha)_i * mask_i, differentiable w.r.t. the logits and the scores."""
        probs = torch.softmax(self._alpha[0], dim=0)
        scores2d = self.scores.reshape(self.out_channels, -1)
        mask = sum(
            p * score_mask(scores2d, s, self.pattern, self.block)
            for p, s in zip(probs, self.sparsities, strict=True)
        )
        return mask.reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mixed_mask(), self.bias)


class MixedKernelDepthwise(nn.Conv2d):
    """A depthwise conv mixed over kernel sizes: one kmax x kmax weight whose centre crops are
    the smaller kernels (zero-padded back to kmax), blended by softmax weights."""

    def __init__(
        self, channels: int, kernels: Sequence[int], alpha: nn.Parameter, stride: int = 1
    ) -> None:
        biggest = max(kernels)
        super().__init__(
            channels, channels, biggest, stride, biggest // 2, groups=channels, bias=False
        )
        if len(kernels) != alpha.numel():
            raise ValueError(f"{len(kernels)} kernels but {alpha.numel()} logits")
        self.kernels = tuple(int(k) for k in kernels)
        masks = []
        for k in self.kernels:
            pad = (biggest - k) // 2
            masks.append(F.pad(torch.ones(k, k), (pad, pad, pad, pad)))
        self.register_buffer("kernel_masks", torch.stack(masks), persistent=False)
        self._alpha = [alpha]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self._alpha[0], dim=0)
        blend = (probs.view(-1, 1, 1) * self.kernel_masks).sum(dim=0)
        return self._conv_forward(x, self.weight * blend, self.bias)
