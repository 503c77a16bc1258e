"""A learned corrective space: paper 004's corrective level F_g(delta_g | Theta_g), F_r(delta_r | Theta_r).

Linear, as paper 004 found best (sec. 7): a geometry basis Theta_g (C_g, N, 3) in mm and a
reflectance basis Theta_r (C_r, N, 3) in linear RGB, with ``F = delta @ Theta``. The bases are
scaled so that the coefficients of the photos they were learned on have unit standard deviation
(the fit's prior on them is N(0, 1)-like). Learned by
:func:`facerecon.fitting.corrective_learning.learn_corrective_space` and stored with a face
model (docs/face-model-format.md, "Corrective space").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass
class CorrectiveSpace:
    """Corrective bases of one face model.

    Attributes:
        geometry: (C_g, N, 3) float32, mm per unit coefficient (zero outside the rendered region).
        reflectance: (C_r, N, 3) float32, reflectance per unit coefficient.
        photos: how many fitted photos it was learned from.
        description: how it was learned (collection, steps, weights).
    """

    geometry: np.ndarray
    reflectance: np.ndarray
    photos: int = 0
    description: str = ""

    @property
    def n_geometry(self) -> int:
        return int(self.geometry.shape[0])

    @property
    def n_reflectance(self) -> int:
        return int(self.reflectance.shape[0])

    def digest(self) -> str:
        """Short hash of the bases (fits record it: another space is another fit)."""
        sha = hashlib.sha256()
        for array in (self.geometry, self.reflectance):
            data = np.ascontiguousarray(array, dtype=np.float32)
            sha.update(str(data.shape).encode())
            sha.update(data.tobytes())
        return sha.hexdigest()[:16]

    def problems(self, n_vertices: int) -> list[str]:
        """Shape and value inconsistencies for a model of ``n_vertices`` (empty when usable)."""
        out = []
        for name in ("geometry", "reflectance"):
            array = getattr(self, name)
            if array.ndim != 3 or array.shape[1:] != (n_vertices, 3) or array.shape[0] < 1:
                out.append(f"correctives {name} basis must be (C, {n_vertices}, 3) with C >= 1, got {array.shape}")
            elif not np.all(np.isfinite(array)):
                out.append(f"correctives {name} basis contains NaN or infinite values")
        return out
