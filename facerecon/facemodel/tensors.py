"""Torch evaluation of a :class:`FaceModel`: coefficients -> vertices and albedo."""

from __future__ import annotations

import math

import torch
from torch import nn

from facerecon.detection.landmarks import IBUG68_FROM_MP478
from facerecon.errors import InputError
from facerecon.facemodel.detector_bias import canonical_pitch_yaw, interpolate_offsets
from facerecon.facemodel.model import FaceModel


def triangle_frames(corners: torch.Tensor) -> torch.Tensor:
    """Orthonormal frames of triangles: rows are the first-edge direction, the in-plane
    perpendicular and the outward normal (counter-clockwise corners).

    Args:
        corners: (..., 3, 3) corner positions (corner, xyz).

    Returns:
        (..., 3, 3) frames (axis, xyz); a rotation of the corners rotates the frames with them.
    """
    edge1 = corners[..., 1, :] - corners[..., 0, :]
    edge2 = corners[..., 2, :] - corners[..., 0, :]
    normal = torch.linalg.cross(edge1, edge2, dim=-1)
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    tangent = edge1 / edge1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.stack([tangent, torch.linalg.cross(normal, tangent, dim=-1), normal], dim=-2)


def embedded_points(vertices: torch.Tensor, triangles: torch.Tensor, barycentric: torch.Tensor,
                    offset: torch.Tensor | None = None) -> torch.Tensor:
    """Points attached to a mesh: barycentric surface points plus an offset in the triangle frame.

    Args:
        vertices: (B, N, 3); triangles: (L, 3) corner vertex indices of each point's triangle;
        barycentric: (L, 3); offset: (L, 3) mm in :func:`triangle_frames` axes, or None.

    Returns:
        (B, L, 3).
    """
    corners = vertices[:, triangles]  # (B, L, 3, 3)
    points = (corners * barycentric[None, :, :, None]).sum(dim=2)
    if offset is None:
        return points
    return points + (offset[None, :, :, None] * triangle_frames(corners)).sum(dim=2)


class FaceModelTensors(nn.Module):
    """The linear model as buffers on one device, evaluated batch-wise.

    Shapes: B batch, N vertices, K_id / K_exp / K_alb coefficients.
    """

    def __init__(self, model: FaceModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model_id = model.model_id
        self.expression_kind = model.expression_kind
        self.expression_names = [str(n) for n in model.expression_names]
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
        # the specular space (paper 002) is built on first use: a Lambertian fit never needs it, and a
        # model without a stored one would compute its default space on every construction
        self._specular_space = model.specular_space
        self._specular: tuple[torch.Tensor, torch.Tensor] | None = None
        if model.dense_triangle is not None:
            self.register_buffer("dense_triangle", torch.as_tensor(model.dense_triangle, dtype=torch.int64))
            self.register_buffer("dense_barycentric", torch.as_tensor(model.dense_barycentric, dtype=dtype))
            offset = model.dense_offset if model.dense_offset is not None else model.dense_barycentric * 0
            self.register_buffer("dense_offset", torch.as_tensor(offset, dtype=dtype))

            # which dense points make up the detector's 68-point subset
            self.register_buffer("ibug68_dense", torch.as_tensor(IBUG68_FROM_MP478, dtype=torch.int64))
        else:
            self.dense_triangle = None
            self.dense_barycentric = None
            self.dense_offset = None
        bias = model.detector_bias
        self.detector_bias_bandwidth = None if bias is None else math.radians(bias.bandwidth_degrees)
        if bias is not None:
            self.register_buffer("detector_bias_angles", torch.as_tensor(bias.angles, dtype=dtype))
            self.register_buffer("detector_bias68", torch.as_tensor(bias.offsets68, dtype=dtype))
        # FaceModel.validate guarantees a dense table matches the dense embedding
        if bias is not None and bias.offsets_dense is not None:
            self.register_buffer("detector_bias_dense", torch.as_tensor(bias.offsets_dense, dtype=dtype))
        else:
            self.detector_bias_dense = None

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
            raise InputError(f"face model {self.model_id!r} has no albedo space")
        values = self.albedo_mean + (coefficients @ self.albedo_basis).reshape(coefficients.shape[0], -1, 3)
        return values

    def _specular_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (N, 3), basis (K_spec, 3N)) on the model's device and dtype, built once."""
        ref = self.mean_shape
        if self._specular is None or self._specular[0].device != ref.device or self._specular[0].dtype != ref.dtype:
            mean, basis, _ = self._specular_space()
            self._specular = (torch.as_tensor(mean, dtype=ref.dtype, device=ref.device),
                              torch.as_tensor(basis, dtype=ref.dtype, device=ref.device).reshape(len(basis), -1))
        return self._specular

    @property
    def n_specular(self) -> int:
        return int(self._specular_tensors()[1].shape[0])

    def specular(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Per-vertex specular albedo (B, N, 3) >= 0 from coefficients (B, K_spec) (paper 002's t_s)."""
        mean, basis = self._specular_tensors()
        values = mean + (coefficients @ basis).reshape(coefficients.shape[0], -1, 3)
        return values.clamp_min(0.0)

    @property
    def landmarks68_from_dense(self) -> bool:
        """True when the 68 landmarks are taken from the dense embedding (see :meth:`landmark_points`)."""
        return self.dense_triangle is not None

    def landmark_points(self, vertices: torch.Tensor) -> torch.Tensor:
        """The 68 iBUG landmark positions (B, 68, 3) of meshes (B, N, 3) in any rigid frame.

        With a dense embedding the 68 points are the embedded mediapipe points the detector's
        68-point subset is made of (``IBUG68_FROM_MP478``), so model and detected landmarks
        share one definition; otherwise the model's own 68 landmark vertices.
        """
        if self.dense_triangle is None:
            return vertices[:, self.landmarks68]
        index = self.ibug68_dense
        return embedded_points(vertices, self.triangles[self.dense_triangle[index]], self.dense_barycentric[index],
                               self.dense_offset[index])

    def landmark_values(self, values: torch.Tensor) -> torch.Tensor:
        """Per-vertex values (B, N, C) (e.g. normals) interpolated at the 68 landmarks' surface points."""
        if self.dense_triangle is None:
            return values[:, self.landmarks68]
        index = self.ibug68_dense
        corners = values[:, self.triangles[self.dense_triangle[index]]]
        return (corners * self.dense_barycentric[index][None, :, :, None]).sum(dim=2)

    def dense_points(self, vertices: torch.Tensor) -> torch.Tensor:
        """Positions (B, L, 3) of the detector's dense landmarks on meshes (B, N, 3)."""
        if self.dense_triangle is None:
            raise InputError(f"face model {self.model_id!r} has no dense landmark embedding")
        return embedded_points(vertices, self.triangles[self.dense_triangle], self.dense_barycentric,
                               self.dense_offset)

    def dense_values(self, values: torch.Tensor) -> torch.Tensor:
        """Per-vertex values (B, N, C) interpolated at the dense landmarks' surface points."""
        if self.dense_triangle is None:
            raise InputError(f"face model {self.model_id!r} has no dense landmark embedding")
        corners = values[:, self.triangles[self.dense_triangle]]
        return (corners * self.dense_barycentric[None, :, :, None]).sum(dim=2)

    @property
    def has_detector_bias(self) -> bool:
        return self.detector_bias_bandwidth is not None

    def detector_offsets(self, angles: torch.Tensor, crop_size: int, relative_to_frontal: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The detector's expected landmark offsets in crop pixels at head poses ``angles``.

        Args:
            angles: (B, 3) (pitch, yaw, roll) radians, as fitted on the aligned crop.
            crop_size: the crop's side in pixels.
            relative_to_frontal: only how the offsets change with the pose (minus those of a
                frontal face), so a frontal face is not corrected.

        Returns:
            (B, 68, 2) and (B, 468, 2) (None without a dense table): detected minus true positions.
        """
        if not self.has_detector_bias:
            raise InputError(f"face model {self.model_id!r} has no detector-bias table")
        query = canonical_pitch_yaw(angles.detach())
        if relative_to_frontal:
            query = torch.cat([query, query.new_zeros(1, 2)])

        def lookup(table: torch.Tensor) -> torch.Tensor:
            values = interpolate_offsets(query, self.detector_bias_angles, table, self.detector_bias_bandwidth)
            if relative_to_frontal:
                values = values[:-1] - values[-1:]
            return values * crop_size

        dense = None if self.detector_bias_dense is None else lookup(self.detector_bias_dense)
        return lookup(self.detector_bias68), dense
