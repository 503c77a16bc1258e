"""Dense landmark embedding: where each mediapipe face-mesh landmark lies on a face model.

Method: render the model's mean face (mean albedo, soft frontal light) at a few yaw angles,
run the same detector the ``detect`` stage uses, and back-project every detected landmark
onto the surface through the rasteriser's triangle id and barycentrics. Each landmark's 3D
positions from the views that see it are averaged (face-oval landmarks use the frontal view
only: on a turned face they slide along the silhouette, cf. paper 004's sliding contour
landmarks), and the average is snapped to the closest surface point, stored as
(triangle, barycentric).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from facerecon.facemodel.geometry import closest_points_on_mesh
from facerecon.facemodel.model import FaceModel, FaceModelError

N_DENSE = 468
DEFAULT_YAWS = (-25.0, 0.0, 25.0)
#: canonical frame (+y up, +z towards the camera) -> OpenCV camera frame (y down, z forward)
CANONICAL_TO_CAMERA = np.diag([1.0, -1.0, -1.0])


def face_oval_indices() -> np.ndarray:
    """Indices of mediapipe's face-oval (silhouette) landmarks."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_FACE_OVAL

    return np.unique(np.array(sorted(FACEMESH_FACE_OVAL)).ravel())


def render_mean_face(model: FaceModel, yaw_degrees: float, image_size: int = 512, fov_degrees: float = 15.0):
    """Render the mean face at ``yaw_degrees``.

    Returns:
        image (H, W, 3) uint8, fragments' triangle id (H, W) int64, screen vertices (N, 3)
        as (u, v, z) float64.
    """
    from facerecon.render.camera import euler_to_matrix, intrinsics_from_fov, project_points
    from facerecon.render.renderer import MeshRenderer

    vertices = torch.as_tensor(model.mean_shape, dtype=torch.float32)[None]
    landmarks = vertices[0, torch.as_tensor(model.landmarks68, dtype=torch.int64)]
    centre = landmarks.mean(dim=0)
    height = float(landmarks[:, 1].max() - landmarks[:, 1].min())
    angles = torch.tensor([[0.0, np.deg2rad(yaw_degrees), 0.0]], dtype=torch.float32)
    rotation = torch.as_tensor(CANONICAL_TO_CAMERA, dtype=torch.float32) @ euler_to_matrix(angles)[0]
    # distance so the landmark span fills about 55 % of the image height
    distance = height / (0.55 * 2.0 * np.tan(np.deg2rad(fov_degrees) / 2.0))
    cam = (vertices - centre) @ rotation.T + torch.tensor([0.0, 0.0, distance])
    intrinsics = intrinsics_from_fov(fov_degrees, (image_size, image_size))
    albedo = torch.as_tensor(model.albedo_mean if model.albedo_mean is not None else
                             np.full((model.n_vertices, 3), 0.7, np.float32), dtype=torch.float32)[None]
    sh = torch.zeros(1, 27)
    sh[:, [0, 9, 18]] = 0.9  # ambient
    sh[:, [3, 12, 21]] = -0.25  # light from the camera side (normals towards -z_cam)
    sh[:, [2, 11, 20]] = -0.1  # and slightly from above
    renderer = MeshRenderer(image_size=(image_size, image_size), backend="torch")
    background = torch.full((1, image_size, image_size, 3), 0.35)
    triangles = torch.as_tensor(model.triangles, dtype=torch.int64)
    # Eyeballs behind the eye openings, as in a photo: the detector places eyelid points on them.
    from facerecon.facemodel.tensors import FaceModelTensors
    from facerecon.synthetic import eyeballs

    eye_vertices, eye_triangles, eye_albedo = eyeballs(FaceModelTensors(model), vertices)
    eye_cam = (eye_vertices - centre) @ rotation.T + torch.tensor([0.0, 0.0, distance])
    out = renderer.render(torch.cat([cam, eye_cam], 1), torch.cat([triangles, eye_triangles + cam.shape[1]]),
                          intrinsics, torch.cat([albedo, eye_albedo], 1), sh, background=background)
    image = (out.image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    screen = project_points(cam, intrinsics)[0].double().numpy()
    triangle_id = out.fragments.triangle_id[0].numpy()
    triangle_id = np.where(triangle_id >= len(triangles), -1, triangle_id)  # eyeball pixels: no face triangle
    return image, triangle_id, screen


def _backproject(points_xy: np.ndarray, triangle_id: np.ndarray, screen: np.ndarray, model: FaceModel):
    """3D mean-shape points (P, 3) under image points (P, 2); NaN where no triangle is hit."""
    from scipy.ndimage import distance_transform_edt

    h, w = triangle_id.shape
    cols = np.clip(np.round(points_xy[:, 0]).astype(int), 0, w - 1)
    rows = np.clip(np.round(points_xy[:, 1]).astype(int), 0, h - 1)
    # Landmarks on a hole's rim (the eye openings have no eyeball) can fall on background:
    # take the nearest covered pixel's triangle, within a few pixels.
    distance, (near_rows, near_cols) = distance_transform_edt(triangle_id < 0, return_indices=True)
    close = distance[rows, cols] <= 6
    rows, cols = near_rows[rows, cols], near_cols[rows, cols]
    tri = np.where(close, triangle_id[rows, cols], -1)
    out = np.full((len(points_xy), 3), np.nan)
    hit = tri >= 0
    corners = model.triangles[tri[hit]]  # (H, 3)
    s = screen[corners]  # (H, 3, 3)
    a, b, c = s[:, 0, :2], s[:, 1, :2], s[:, 2, :2]
    p = points_xy[hit]
    den = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    den = np.where(np.abs(den) < 1e-12, 1e-12, den)
    l1 = ((p[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (p[:, 1] - a[:, 1])) / den
    l2 = ((b[:, 0] - a[:, 0]) * (p[:, 1] - a[:, 1]) - (p[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])) / den
    bary = np.clip(np.stack([1 - l1 - l2, l1, l2], axis=1), 0, 1)
    bary /= bary.sum(axis=1, keepdims=True)
    out[hit] = (model.mean_shape[corners].astype(np.float64) * bary[:, :, None]).sum(axis=1)
    return out


def embed_dense_landmarks(model: FaceModel, yaws: tuple[float, ...] = DEFAULT_YAWS, analyzer=None) -> FaceModel:
    """Return a copy of ``model`` with ``dense_triangle`` / ``dense_barycentric`` set.

    Raises:
        FaceModelError: when the detector finds no face in the frontal render.
    """
    from facerecon.detection.mediapipe_backend import FaceAnalyzer

    own = analyzer is None
    analyzer = analyzer or FaceAnalyzer(max_faces=1)
    oval = face_oval_indices()
    samples = np.full((len(yaws), N_DENSE, 3), np.nan)
    try:
        for v, yaw in enumerate(yaws):
            image, triangle_id, screen = render_mean_face(model, yaw)
            faces = analyzer.analyze(image)
            if not faces:
                continue
            samples[v] = _backproject(faces[0].landmarks478[:N_DENSE, :2].astype(np.float64), triangle_id, screen,
                                      model)
    finally:
        if own:
            analyzer.close()
    frontal = int(np.argmin(np.abs(np.asarray(yaws))))
    if np.isnan(samples[frontal]).all():
        raise FaceModelError("the detector found no face in the rendered mean face; dense embedding unavailable")
    samples[:, oval] = np.where(np.arange(len(yaws))[:, None, None] == frontal, samples[:, oval], np.nan)
    with np.errstate(invalid="ignore"):
        points = np.nanmean(samples, axis=0)
    missing = np.isnan(points).any(axis=1)
    if missing.any():
        raise FaceModelError(f"{int(missing.sum())} dense landmarks could not be placed on the surface")
    triangle, bary, _ = closest_points_on_mesh(points, model.mean_shape.astype(np.float64), model.triangles)
    return dataclasses.replace(model, dense_triangle=triangle.astype(np.int32),
                               dense_barycentric=bary.astype(np.float32))
