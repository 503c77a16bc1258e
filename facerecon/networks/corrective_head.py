"""Paper 004's corrective level in the network: heads regressing the corrective coefficients
delta_g, delta_r and the linear corrective space Theta_g, Theta_r that turns them into
per-vertex fields (paper 004 sec. 4.2, eqs. 1-2: ``F = delta @ Theta``).

The bases live on the face model's rendered ``photometric`` region (S vertices; zero elsewhere,
as the fit's correctives) and are module parameters: trained with the network (paper 004 learns
Theta jointly with the regressor) or frozen (a face model's stored space). Both heads start at
zero, so a network with a fresh corrective level predicts exactly its base level.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

#: RMS of a unit coefficient's field for bases initialised without a stored space:
#: geometry in mm, reflectance in [0, 1] RGB
RANDOM_GEOMETRY_RMS = 0.5
RANDOM_REFLECTANCE_RMS = 0.02
#: spatial frequency scale (1/mm) of the smooth random initial bases
RANDOM_WAVELENGTH_MM = 40.0


class CorrectiveLevel(nn.Module):
    """Heads and bases of the corrective level.

    Args:
        features: width of the backbone's pooled features (512 on resnet18/34, 2048 on resnet50/101).
        n_vertices: N, the face model's vertex count.
        support: (S,) int64 vertex indices the correctives live on.
        geometry_modes, reflectance_modes: C_g, C_r.

    Members:
        geometry_head, reflectance_head: Linear(features -> C_g), Linear(features -> C_r), zero at start.
        geometry_basis, reflectance_basis: (C, S * 3) parameters (Theta; mm resp. reflectance per unit
            coefficient), zero until :meth:`initialise` or a checkpoint fills them.
        support: (S,) int64 buffer.
    """

    def __init__(self, features: int, n_vertices: int, support: torch.Tensor, geometry_modes: int,
                 reflectance_modes: int):
        super().__init__()
        self.n_vertices = int(n_vertices)
        self.geometry_head = nn.Linear(features, geometry_modes)
        self.reflectance_head = nn.Linear(features, reflectance_modes)
        for head in (self.geometry_head, self.reflectance_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        s = int(support.numel())
        self.register_buffer("support", torch.as_tensor(support, dtype=torch.int64).clone())
        self.geometry_basis = nn.Parameter(torch.zeros(geometry_modes, s * 3))
        self.reflectance_basis = nn.Parameter(torch.zeros(reflectance_modes, s * 3))

    @property
    def layout(self) -> dict[str, int]:
        """What a checkpoint needs to rebuild the module: C_g, C_r and S."""
        return {"geometry_modes": int(self.geometry_basis.shape[0]),
                "reflectance_modes": int(self.reflectance_basis.shape[0]),
                "support_size": int(self.support.numel())}

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled features (B, features) -> ``corrective_geometry`` (B, C_g), ``corrective_reflectance`` (B, C_r)."""
        return {"corrective_geometry": self.geometry_head(pooled),
                "corrective_reflectance": self.reflectance_head(pooled)}

    def fields(self, coefficients: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(F_g, F_r), (B, N, 3) each (zero off the support), of :meth:`forward`'s coefficients
        (float32 whatever the autocast state)."""
        device = self.geometry_basis.device.type
        with torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext():
            geometry = coefficients["corrective_geometry"].float() @ self.geometry_basis.float()
            reflectance = coefficients["corrective_reflectance"].float() @ self.reflectance_basis.float()
        return self._on_mesh(geometry), self._on_mesh(reflectance)

    def _on_mesh(self, flat: torch.Tensor) -> torch.Tensor:
        b = flat.shape[0]
        full = flat.new_zeros(b, self.n_vertices, 3)
        return full.index_copy(1, self.support, flat.reshape(b, -1, 3))

    def space_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The bases as a face model's corrective space arrays: (C_g, N, 3) and (C_r, N, 3) float32."""
        out = []
        for basis in (self.geometry_basis, self.reflectance_basis):
            c = basis.shape[0]
            full = torch.zeros(c, self.n_vertices, 3, dtype=torch.float32, device=basis.device)
            full[:, self.support] = basis.detach().float().reshape(c, -1, 3)
            out.append(full.cpu().numpy())
        return out[0], out[1]

    @torch.no_grad()
    def initialise(self, points: torch.Tensor | None = None, space=None, seed: int = 0) -> str:
        """Fill the bases: from a stored space (``space.geometry`` (C_g, N, 3), ``space.reflectance``
        (C_r, N, 3), restricted to the support), else with smooth random fields of the support's mean-shape
        positions ``points`` (N, 3) mm (sums of random plane waves, RMS :data:`RANDOM_GEOMETRY_RMS` mm and
        :data:`RANDOM_REFLECTANCE_RMS` per unit coefficient; with zero heads and zero bases no gradient
        would reach either). Returns a description of what was used."""
        if space is not None:
            for basis, array in ((self.geometry_basis, space.geometry), (self.reflectance_basis, space.reflectance)):
                values = torch.as_tensor(np.asarray(array), dtype=basis.dtype, device=basis.device)[:, self.support]
                if values.shape[0] != basis.shape[0]:
                    raise ValueError(f"corrective space has {values.shape[0]} modes, the network {basis.shape[0]}")
                basis.copy_(values.reshape(basis.shape[0], -1))
            return "face model's corrective space"
        generator = torch.Generator().manual_seed(seed)
        xyz = points[self.support].detach().double().cpu()
        xyz = xyz - xyz.mean(dim=0)
        targets = ((self.geometry_basis, RANDOM_GEOMETRY_RMS), (self.reflectance_basis, RANDOM_REFLECTANCE_RMS))
        for basis, rms in targets:
            c = basis.shape[0]
            waves = 4  # plane waves per mode and channel
            direction = torch.randn(c, 3, waves, 3, generator=generator, dtype=torch.float64)
            direction = direction / direction.norm(dim=-1, keepdim=True)
            frequency = 2 * math.pi / RANDOM_WAVELENGTH_MM * (0.5 + torch.rand(c, 3, waves, 1, generator=generator,
                                                                                 dtype=torch.float64))
            phase = 2 * math.pi * torch.rand(c, 3, waves, generator=generator, dtype=torch.float64)
            # (C, 3 channels, waves, S) -> field (C, S, 3)
            angle = torch.einsum("cwkd,sd->cwks", direction * frequency, xyz) + phase[..., None]
            field = torch.cos(angle).sum(dim=2).permute(0, 2, 1)
            field = field / field.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-12) * rms
            basis.copy_(field.reshape(c, -1).to(basis))
        return "smooth random fields"
