"""Differentiable batched mesh rendering (pure PyTorch, CPU and CUDA).

See docs/rendering.md for the conventions. Public API:

* camera: :func:`euler_to_matrix`, :func:`matrix_to_euler`, :func:`transform_points`,
  :func:`project_points`, :func:`intrinsics_from_fov`;
* rasterization: :class:`Fragments`, :func:`rasterize`, :func:`interpolate`;
* shading: :func:`vertex_normals`, :func:`sh_basis`, :func:`sh_irradiance`,
  :func:`shade_lambertian`, :class:`SpecularLight`, :func:`blinn_phong`, :func:`shade_specular`;
* renderer: :class:`MeshRenderer`, :class:`RenderOutput`, :func:`available_backends`.
"""

from .camera import (
    euler_to_matrix,
    intrinsics_from_fov,
    matrix_to_euler,
    project_points,
    transform_points,
)
from .pytorch3d_backend import BackendUnavailableError
from .rasterize import Fragments, interpolate, rasterize
from .renderer import MeshRenderer, RenderOutput, available_backends
from .shading import SpecularLight, blinn_phong, sh_basis, sh_irradiance, shade_lambertian, shade_specular, vertex_normals

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "transform_points",
    "project_points",
    "intrinsics_from_fov",
    "Fragments",
    "rasterize",
    "interpolate",
    "vertex_normals",
    "sh_basis",
    "sh_irradiance",
    "shade_lambertian",
    "SpecularLight",
    "blinn_phong",
    "shade_specular",
    "MeshRenderer",
    "RenderOutput",
    "available_backends",
    "BackendUnavailableError",
]
