"""Spectral regularisation of every weight-normalised conv and the BN-gamma L-inf penalty."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusionvae.model.host_copy import HostCopy
from fusionvae.model.layers import WNConv2d, stacked_weights


def power_iteration(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched power iteration on ``w [G, m, n]`` with unit vectors ``u [G, m]``, ``v [G, n]``."""
    for _ in range(steps):
        v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=1e-3)  # w^T u
        u = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3)  # w v
    return u, v


def _span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D view over ``tensors`` when they lie back to back in memory (the step engine keeps
    buffers so, in registration order), else None."""
    ptr = tensors[0].data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() != ptr:
            return None
        ptr += t.numel() * t.element_size()
    return torch.as_strided(tensors[0], (sum(t.numel() for t in tensors),), (1,))


class SpectralPenalty(nn.Module):
    """Sum of the largest singular values of all conv weights (as ``[out, in*k*k]`` matrices).

    Convs of equal shape are stacked and iterated in one batched call; the persistent u / v
    vectors are buffers, so they are saved in and restored from checkpoints. The vectors of all
    shapes are normalised together (row norms of one concatenation, ``_normalise_rows``) and the
    penalty is one dot product: a few ops in all instead of a few per shape.
    """

    def __init__(self, model: nn.Module, init_steps: int = 10, steps: int = 1):
        super().__init__()
        self.steps, self.init_steps = steps, init_steps
        by_shape: dict[tuple, list[WNConv2d]] = defaultdict(list)
        for mod in model.modules():
            if isinstance(mod, WNConv2d):
                by_shape[tuple(mod.weight.shape)].append(mod)
        # plain list, not submodules: the convs' parameters belong to the model
        self.groups = [convs for _, convs in sorted(by_shape.items())]
        shapes = [self._weights(convs).shape for convs in self.groups]  # [G, out, in k k]
        us, vs = [], []
        for g, m, n in shapes:  # drawn in this order since the first version: the same start
            us.append(F.normalize(torch.randn(g, m), dim=1))
            vs.append(F.normalize(torch.randn(g, n), dim=1))
        for name, vectors in (("u", us), ("v", vs)):  # all u, then all v: back to back once flat
            for i, t in enumerate(vectors):
                self.register_buffer(f"{name}{i}", t)
        for name, column in (("u_rows", 1), ("v_rows", 2)):  # the row lengths, for the row norms
            rows = [shape[column] for shape in shapes for _ in range(shape[0])]
            self.register_buffer(name, torch.tensor(rows, dtype=torch.long), persistent=False)
        self.register_buffer("initialised", torch.tensor(False))
        self._initialised = HostCopy()  # no device read per step

    @staticmethod
    def _weights(convs: list[WNConv2d]) -> torch.Tensor:
        """``[G, out, in k k]``: this step's normalised weights, reused from the forward pass."""
        return stacked_weights(convs)

    def start_step(self) -> None:
        """Forget the weights of the previous forward pass (call before each training forward: the
        regulariser must not see a validation pass's)."""
        for convs in self.groups:
            for conv in convs:
                conv.given_weight = conv.given_group = None

    def first_step(self) -> bool:
        """Whether the next training pass starts the power iteration (``init_steps`` iterations from
        the random start): a device read in the first steps only. The step's Python path depends
        on it, so the training step reads it on the host side of a CUDA-graph capture and keys
        the graphs by it (``fusionvae.training.step_graph``)."""
        return not self._initialised.get(self.initialised)

    def _vectors(self, name: str) -> list[torch.Tensor]:
        return [getattr(self, f"{name}{i}") for i in range(len(self.groups))]

    def forward(self) -> torch.Tensor:
        """sum_g u_g^T W_g v_g. Training: ``steps`` power iterations first, the last one shared
        with the penalty (``W v`` gives both the next u and the penalty's factor), the vectors
        written into their buffers in place."""
        if not self.groups:
            return torch.zeros((), device=self.initialised.device)
        first = self.first_step()
        steps = self.init_steps if first else self.steps
        ws = [self._weights(convs).float() for convs in self.groups]
        us, vs = self._vectors("u"), self._vectors("v")
        if self.training:
            with torch.no_grad():
                if steps > 1:  # the first step's extra iterations
                    for w, u, v in zip(ws, us, vs):
                        u.copy_(power_iteration(w, u, v, steps - 1)[0])
                wtu = torch.cat([torch.bmm(u.unsqueeze(1), w).reshape(-1) for w, u in zip(ws, us)])
                _normalise_rows(wtu, self.v_rows, vs)
        wv = torch.cat([torch.bmm(w, v.unsqueeze(2)).reshape(-1) for w, v in zip(ws, vs)])  # grads reach w here
        if self.training:
            with torch.no_grad():
                _normalise_rows(wv, self.u_rows, us)
            if first:
                self.initialised.fill_(True)
                # a skipped step puts the flag back (fusionvae.training.step): read it again next
                # step (a host read in the first steps only; later steps leave the flag as it is)
                self._initialised.forget()
        return torch.dot(torch.cat([u.reshape(-1) for u in us]), wv)


def _normalise_rows(x: torch.Tensor, rows: torch.Tensor, out: list[torch.Tensor]) -> None:
    """Write ``x``, cut into rows of lengths ``rows`` and each divided by max(its norm, 1e-3) (as
    ``F.normalize`` does), into the tensors ``out``: one op per step of the maths for all rows,
    and one write when ``out`` lies back to back in memory."""
    norms = torch.segment_reduce(x.square(), "sum", lengths=rows, unsafe=True).sqrt_().clamp_min_(1e-3)
    y = x / torch.repeat_interleave(norms, rows, output_size=x.numel())  # output_size: no host read
    span = _span(out)
    if span is not None:
        span.copy_(y)
    else:
        torch._foreach_copy_(out, [part.view_as(t) for part, t in zip(y.split([t.numel() for t in out]), out)])


class BatchNormPenalty(nn.Module):
    """Sum over BN layers of max |gamma|, in a few ops for all layers: their gammas side by side,
    one segmented max, one sum (a max per layer was two ops each, and its CPU backward read a
    device value into Python twice per layer). The segment lengths are a buffer, made once: a
    tensor made from a Python list each step would be a blocking host-to-device copy on a GPU."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = [model]  # a list, not a submodule: the gammas belong to the model
        lengths = [g.numel() for g in self._gammas()]
        self.register_buffer("lengths", torch.tensor(lengths, dtype=torch.long), persistent=False)

    def _gammas(self) -> list[torch.Tensor]:
        bns = (m for m in self.model[0].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        return [m.weight for m in bns if m.affine]

    def forward(self) -> torch.Tensor:
        gammas = self._gammas()
        if not gammas:
            return torch.zeros((), device=self.lengths.device)
        return torch.segment_reduce(torch.cat(gammas).abs(), "max", lengths=self.lengths, unsafe=True).sum()
