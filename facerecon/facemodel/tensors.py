"""Torch evaluation of a :class:`FaceModel`: coefficients -> vertices and albedo."""

from __future__ import annotations

import torch
from torch import nn

from facerecon.facemodel.model import FaceModel


class FaceModelTensors(nn.Module):
    """The linear model as buffers on one device, evaluated batch-wise.

    Shapes: B batch, N vertices, K_id / K_exp / K_alb coefficients.
    """

    def __init__(self, model: FaceModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model_id = model.model_id
        self.expression_kind = model.expression_kind
        n = model.n_vertices
        self.register_buffer("mean_shape", torch.as_tensor(model.mean_shape, dtype=dtype))
        # Bases kept as (K, 3N) so a batch evaluates with one matmul.
        self.register_buffer("identity_basis", torch.as_tensor(model.identity_basis, dtype=dtype).reshape(-1, 3 * n))
        self.register_buffer(
            "expression_basis", torch.as_tensor(model.expression_basis, dtype=dtype).reshape(-1, 3 * n)
        )
        self.register_buffer("triangles", torch.as_tensor(model.triangles, dtype=torch.int64))
        self.register_buffer("landmarks68", torch.as_tensor(model.landmarks68, dtype=torch.int64))
        if model.albedo_mean is not None:
            self.register_buffer("albedo_mean", torch.as_tensor(model.albedo_mean, dtype=dtype))
            basis = model.albedo_basis if model.albedo_basis is not None else model.albedo_mean[None] * 0
            self.register_buffer("albedo_basis", torch.as_tensor(basis, dtype=dtype).reshape(-1, 3 * n))
        else:
            self.albedo_mean = None
            self.albedo_basis = None
        if model.dense_triangle is not None:
            self.register_buffer("dense_triangle", torch.as_tensor(model.dense_triangle, dtype=torch.int64))
            self.register_buffer("dense_barycentric", torch.as_tensor(model.dense_barycentric, dtype=dtype))
            from facerecon.detection.landmarks import IBUG68_FROM_MP478

            # which dense points make up the detector's 68-point subset
            self.register_buffer("ibug68_dense", torch.as_tensor(IBUG68_FROM_MP478, dtype=torch.int64))
        else:
            self.dense_triangle = None
            self.dense_barycentric = None

    @property
    def n_vertices(self) -> int:
        return int(self.mean_shape.shape[0])

    @property
    def n_identity(self) -> int:
        return int(self.identity_basis.shape[0])

    @property
    def n_expression(self) -> int:
        return int(self.expression_basis.shape[0])

    @property
    def n_albedo(self) -> int:
        return 0 if self.albedo_basis is None else int(self.albedo_basis.shape[0])

    def shape(self, identity: torch.Tensor, expression: torch.Tensor | None = None) -> torch.Tensor:
        """Vertices (B, N, 3) in mm, canonical frame, from identity (B, K_id) and expression (B, K_exp)."""
        offsets = identity @ self.identity_basis
        if expression is not None:
            offsets = offsets + expression @ self.expression_basis
        return self.mean_shape + offsets.reshape(identity.shape[0], -1, 3)

    def albedo(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Per-vertex reflectance (B, N, 3) from albedo coefficients (B, K_alb)."""
        if self.albedo_mean is None:
            raise ValueError(f"face model {self.model_id!r} has no albedo space")
        values = self.albedo_mean + (coefficients @ self.albedo_basis).reshape(coefficients.shape[0], -1, 3)
        return values

    @property
    def landmarks68_from_dense(self) -> bool:
        """True when the 68 landmarks are taken from the dense embedding (see :meth:`landmark_points`)."""
        return self.dense_triangle is not None

    def landmark_points(self, values: torch.Tensor) -> torch.Tensor:
        """The 68 iBUG landmarks (B, 68, C) of per-vertex values (B, N, C): positions or normals.

        With a dense embedding the 68 points are the embedded mediapipe points the detector's
        68-point subset is made of (``IBUG68_FROM_MP478``), so model and detected landmarks
        share one definition; otherwise the model's own 68 landmark vertices.
        """
        if self.dense_triangle is None:
            return values[:, self.landmarks68]
        corners = values[:, self.triangles[self.dense_triangle[self.ibug68_dense]]]  # (B, 68, 3, C)
        return (corners * self.dense_barycentric[self.ibug68_dense][None, :, :, None]).sum(dim=2)

    def dense_points(self, vertices: torch.Tensor) -> torch.Tensor:
        """Surface points (B, L, C) matching the detector's dense landmarks, from per-vertex (B, N, C)."""
        if self.dense_triangle is None:
            raise ValueError(f"face model {self.model_id!r} has no dense landmark embedding")
        corners = vertices[:, self.triangles[self.dense_triangle]]  # (B, L, 3, 3)
        return (corners * self.dense_barycentric[None, :, :, None]).sum(dim=2)
