"""Dense landmark embedding: where each mediapipe face-mesh landmark lies on a face model.

Method: render the model's mean face (mean albedo, soft frontal light, eyeballs) from a grid
of views (yaw -45..45 x pitch -15..15), run the same detector the ``detect`` stage uses, and
triangulate every landmark from the views that see it: the 3D point whose projections best
match the detections (linear least squares over all views, one pass dropping outlying
views). The detector's landmarks are 3D points that need not lie on the skin: eyelid points
sit over the eye opening, lip points inside the lip line. A point glued to the surface
projects right only from the view it was measured in and drifts by offset x sin(angle)
elsewhere (3-4 % of the eye distance at 40 degrees of yaw on ICT). So each point is stored as
its closest surface point (triangle, barycentric) plus the remaining offset in that
triangle's frame, which moves and turns with the face.

Face-oval landmarks are not fixed points of the face: on a turned face they slide along the
silhouette (cf. paper 004's sliding contour landmarks). They are back-projected onto the
surface from the frontal view only, with no offset, after a step onto the occluding surface:
the pixel under a detected outline point is often the neck or ear behind the edge
(:func:`outline_points`).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from facerecon.detection.landmarks import LIPS_INNER
from facerecon.detection.mediapipe_backend import FaceAnalyzer
from facerecon.facemodel.geometry import closest_points_on_mesh
from facerecon.facemodel.model import FaceModel, FaceModelError
from facerecon.facemodel.tensors import FaceModelTensors, triangle_frames
from facerecon.render.camera import euler_to_matrix, intrinsics_from_fov, project_points
from facerecon.render.renderer import MeshRenderer
from facerecon.render.shading import SH_CONSTANTS
from facerecon.synthetic import eyeballs, textured_backgrounds

N_DENSE = 468
#: version of the embedding method, stored in the model's attributes (``dense_embedding``);
#: 2: face-outline points stepped onto the occluding surface (:func:`outline_points`);
#: 3: inner-lip points attached to their own lip (:func:`_attach_inner_lips`)
EMBEDDING_VERSION = 3
#: mediapipe's inner-lip contour between the corners (78, 308): upper lip, lower lip
LIPS_INNER_UPPER = LIPS_INNER[1:10]
LIPS_INNER_LOWER = LIPS_INNER[11:]
DEFAULT_YAWS = (-45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0)
DEFAULT_PITCHES = (-15.0, 0.0, 15.0)
#: canonical frame (+y up, +z towards the camera) -> OpenCV camera frame (y down, z forward)
CANONICAL_TO_CAMERA = np.diag([1.0, -1.0, -1.0])


def embedding_version(model: FaceModel) -> str | None:
    """The embedding method's version recorded in ``model`` (``EMBEDDING_VERSION`` when made
    now); None without an embedding or without a record (made before versions were recorded)."""
    if getattr(model, "dense_triangle", None) is None:
        return None
    return getattr(model, "attributes", {}).get("dense_embedding")


def embedding_outdated(model: FaceModel) -> bool:
    """Whether ``model`` has a dense embedding made by an older method (refresh it with
    ``facerecon model calibrate``)."""
    return model.dense_triangle is not None and embedding_version(model) != str(EMBEDDING_VERSION)


def face_oval_indices() -> np.ndarray:
    """Indices of mediapipe's face-oval (silhouette) landmarks."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_FACE_OVAL

    return np.unique(np.array(sorted(FACEMESH_FACE_OVAL)).ravel())


def standard_light() -> torch.Tensor:
    """SH light (27,): a photo-like exposure, mostly from the camera side, a little from above."""
    sh = torch.zeros(27)
    sh[[0, 9, 18]] = 0.9 / SH_CONSTANTS[0]  # ambient: a white surface facing the light renders at ~0.9
    sh[[3, 12, 21]] = -0.25  # from the camera side (normals towards -z_cam)
    sh[[2, 11, 20]] = -0.1  # and slightly from above
    return sh


def varied_lights(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` SH lights (count, 27) spread like the synthetic faces' (white-ish, off-axis)."""
    sh = torch.zeros(count, 27)
    level = (0.7 + 0.4 * torch.rand(count, 1, generator=generator)) / SH_CONSTANTS[0]
    sh[:, [0, 9, 18]] = level * (0.92 + 0.16 * torch.rand(count, 3, generator=generator))
    direction = torch.randn(count, 3, generator=generator) * 0.12
    for channel in range(3):
        sh[:, 9 * channel + 1: 9 * channel + 4] = direction
    return sh


def render_mean_face(model: FaceModel, yaw_degrees: float, image_size: int = 512, fov_degrees: float = 15.0,
                     pitch_degrees: float = 0.0, return_projection: bool = False, roll_degrees: float = 0.0,
                     sh: torch.Tensor | None = None, background: torch.Tensor | None = None):
    """Render the mean face at ``yaw_degrees`` / ``pitch_degrees`` / ``roll_degrees``.

    ``sh`` (27,) is the light (default: :func:`standard_light`); ``background`` (H, W, 3) in
    [0, 1] (default: flat grey).

    Returns:
        image (H, W, 3) uint8, fragments' triangle id (H, W) int64, screen vertices (N, 3)
        as (u, v, z) float64, and with ``return_projection`` the (3, 4) float64 matrix
        mapping homogeneous mean-shape points to homogeneous pixels.
    """
    vertices = torch.as_tensor(model.mean_shape, dtype=torch.float32)[None]
    landmarks = vertices[0, torch.as_tensor(model.landmarks68, dtype=torch.int64)]
    centre = landmarks.mean(dim=0)
    height = float(landmarks[:, 1].max() - landmarks[:, 1].min())
    angles = torch.tensor([[np.deg2rad(pitch_degrees), np.deg2rad(yaw_degrees), np.deg2rad(roll_degrees)]],
                          dtype=torch.float32)
    rotation = torch.as_tensor(CANONICAL_TO_CAMERA, dtype=torch.float32) @ euler_to_matrix(angles)[0]
    # distance so the landmark span fills about 55 % of the image height
    distance = height / (0.55 * 2.0 * np.tan(np.deg2rad(fov_degrees) / 2.0))
    cam = (vertices - centre) @ rotation.T + torch.tensor([0.0, 0.0, distance])
    intrinsics = intrinsics_from_fov(fov_degrees, (image_size, image_size))
    albedo = torch.as_tensor(model.albedo_mean if model.albedo_mean is not None else
                             np.full((model.n_vertices, 3), 0.7, np.float32), dtype=torch.float32)[None]
    sh = (standard_light() if sh is None else sh.float())[None]
    renderer = MeshRenderer(image_size=(image_size, image_size), backend="torch")
    background = torch.full((1, image_size, image_size, 3), 0.35) if background is None else \
        background.float()[None]
    triangles = torch.as_tensor(model.triangles, dtype=torch.int64)
    # Eyeballs behind the eye openings, as in a photo: the detector places eyelid points on them.

    eye_vertices, eye_triangles, eye_albedo = eyeballs(FaceModelTensors(model), vertices)
    eye_cam = (eye_vertices - centre) @ rotation.T + torch.tensor([0.0, 0.0, distance])
    out = renderer.render(torch.cat([cam, eye_cam], 1), torch.cat([triangles, eye_triangles + cam.shape[1]]),
                          intrinsics, torch.cat([albedo, eye_albedo], 1), sh, background=background)
    image = (out.image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    screen = project_points(cam, intrinsics)[0].double().numpy()
    triangle_id = out.fragments.triangle_id[0].numpy()
    triangle_id = np.where(triangle_id >= len(triangles), -1, triangle_id)  # eyeball pixels: no face triangle
    if not return_projection:
        return image, triangle_id, screen
    translation = torch.tensor([0.0, 0.0, distance]) - rotation @ centre
    projection = intrinsics[0].double() @ torch.cat([rotation.double(), translation.double()[:, None]], dim=1)
    return image, triangle_id, screen, projection.numpy()


def _backproject(points_xy: np.ndarray, triangle_id: np.ndarray, screen: np.ndarray, model: FaceModel):
    """3D mean-shape points (P, 3) under image points (P, 2); NaN where no triangle is hit."""
    from scipy.ndimage import distance_transform_edt

    rows, cols = _nearest_pixels(points_xy, triangle_id.shape)
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


def _nearest_pixels(points_xy: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices (...) of the pixels nearest image points (..., 2), inside an image of ``shape``."""
    h, w = shape
    return (np.clip(np.round(points_xy[..., 1]).astype(int), 0, h - 1),
            np.clip(np.round(points_xy[..., 0]).astype(int), 0, w - 1))


def _pixel_depth(points_xy: np.ndarray, triangle_id: np.ndarray, screen: np.ndarray, model: FaceModel) -> np.ndarray:
    """Camera depth (...) of the surface at image points (..., 2), in mm: the mean depth of the triangle
    drawn at the nearest pixel; +inf on background."""
    tri = triangle_id[_nearest_pixels(points_xy, triangle_id.shape)]
    depth = screen[model.triangles[np.maximum(tri, 0)], 2].mean(axis=-1)
    return np.where(tri >= 0, depth, np.inf)


def outline_points(points_xy: np.ndarray, centre: np.ndarray, triangle_id: np.ndarray, screen: np.ndarray,
                   model: FaceModel, search: int = 4, jump_mm: float = 20.0) -> np.ndarray:
    """Face-outline points (P, 2) moved onto the occluding surface.

    A detected outline point sits on the edge of the face in the image, and the pixel under
    it is as often the surface behind the edge (neck under the jaw, ear beside the cheek) or
    background as the face itself, so back-projecting it as it is lands some outline points
    tens of millimetres behind their neighbours. Each point walks up to ``search`` pixels
    towards ``centre`` (2,) and stops after the last depth step larger than ``jump_mm``
    (a depth discontinuity, not a surface at a grazing angle); without one it stays.
    """
    direction = centre[None] - points_xy
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
    steps = np.arange(search + 1, dtype=np.float64)
    samples = points_xy[:, None] + steps[None, :, None] * direction[:, None]  # (P, K+1, 2)
    depth = _pixel_depth(samples, triangle_id, screen, model)
    with np.errstate(invalid="ignore"):
        jump = depth[:, :-1] - depth[:, 1:]  # inf - inf = nan: background both sides, no step
    big = np.nan_to_num(jump, nan=0.0, posinf=np.inf) > jump_mm
    last = np.where(big.any(axis=1), search - 1 - np.argmax(big[:, ::-1], axis=1), -1)
    return points_xy + (last + 1)[:, None] * direction


def _attach_inner_lips(points: np.ndarray, shape: np.ndarray, triangles: np.ndarray, triangle: np.ndarray,
                       bary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest surface points (``triangle`` (L,), ``bary`` (L, 3)) of the inner-lip landmarks
    redone on their own lip: upper inner-lip points (P, 3 ``points`` of all L landmarks) on
    triangles that face down (the underside of the upper lip), lower ones on triangles that
    face up. On a closed mouth both lips meet at the inner lip line, and a point there is as
    close to one lip as to the other; glued to the wrong one it follows the jaw when the mouth
    opens and drags the upper inner-lip contour down with it. Canonical frame: +y up."""
    corners = shape[triangles]
    normal_y = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])[:, 1]
    triangle, bary = triangle.copy(), bary.copy()
    for side, facing in ((list(LIPS_INNER_UPPER), normal_y < 0), (list(LIPS_INNER_LOWER), normal_y > 0)):
        allowed = np.nonzero(facing)[0]
        found, weights, _ = closest_points_on_mesh(points[side], shape, triangles[allowed])
        triangle[side], bary[side] = allowed[found], weights
    return triangle, bary


def triangulate(points_xy: np.ndarray, projections: np.ndarray, outlier_factor: float = 3.0) -> np.ndarray:
    """Least-squares 3D points from their projections in several views.

    Args:
        points_xy: (V, P, 2) pixel positions, NaN where a view has no detection.
        projections: (V, 3, 4) camera matrices.
        outlier_factor: after a first solve, observations whose reprojection error exceeds this
            multiple of the point's median error (and 1 px) are dropped and the point re-solved.

    Returns:
        (P, 3) points; NaN where fewer than two views saw a point.
    """
    seen = ~np.isnan(points_xy).any(axis=2)  # (V, P)
    xy = np.nan_to_num(points_xy)
    # each view gives two linear equations (u p3 - p1) X = p1_4 - u p3_4, likewise for v
    rows_a = np.concatenate([xy[..., :1, None] * projections[:, None, 2:3, :3] - projections[:, None, 0:1, :3],
                             xy[..., 1:2, None] * projections[:, None, 2:3, :3] - projections[:, None, 1:2, :3]],
                            axis=2)  # (V, P, 2, 3)
    rows_b = np.concatenate([projections[:, None, 0:1, 3] - xy[..., :1] * projections[:, None, 2:3, 3],
                             projections[:, None, 1:2, 3] - xy[..., 1:2] * projections[:, None, 2:3, 3]],
                            axis=2)  # (V, P, 2)

    def solve(use: np.ndarray) -> np.ndarray:
        w = use[..., None, None].astype(np.float64)
        normal = np.einsum("vpik,vpil->pkl", rows_a * w, rows_a)
        rhs = np.einsum("vpik,vpi->pk", rows_a * w, rows_b * use[..., None])
        enough = use.sum(axis=0) >= 2
        normal[~enough] = np.eye(3)
        solved = np.linalg.solve(normal, rhs[..., None])[..., 0]
        solved[~enough] = np.nan
        return solved

    points = solve(seen)
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    reprojected = np.einsum("vij,pj->vpi", projections, homogeneous)
    error = np.linalg.norm(reprojected[..., :2] / reprojected[..., 2:] - xy, axis=2)
    error = np.where(seen, error, np.nan)
    with warnings.catch_warnings():  # points no view saw have an all-NaN column; they stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        limit = np.maximum(outlier_factor * np.nanmedian(error, axis=0), 1.0)
    return solve(seen & (np.nan_to_num(error) <= limit))


def embed_dense_landmarks(model: FaceModel, yaws: tuple[float, ...] = DEFAULT_YAWS,
                          pitches: tuple[float, ...] = DEFAULT_PITCHES, lights_per_view: int = 3,
                          analyzer=None) -> FaceModel:
    """Return a copy of ``model`` with ``dense_triangle`` / ``dense_barycentric`` / ``dense_offset`` set.

    Raises:
        FaceModelError: when the detector finds no face in the frontal render.
    """
    own = analyzer is None
    analyzer = analyzer or FaceAnalyzer(max_faces=1)
    oval = face_oval_indices()

    # The detector's points shift with exposure, light direction and roll (by ~1 % of the eye
    # distance from a dim to a normally exposed render), so every view is seen under several
    # photo-like lights, rolls and backgrounds, and the triangulation averages over them.
    generator = torch.Generator().manual_seed(0)
    views = [(y, p) for y in yaws for p in pitches]
    lights = torch.cat([standard_light()[None].expand(len(views), 27)[:, None],
                        varied_lights(len(views) * (lights_per_view - 1), generator).reshape(
                            len(views), lights_per_view - 1, 27)], dim=1)
    rolls = torch.cat([torch.zeros(len(views), 1), -8 + 16 * torch.rand(len(views), lights_per_view - 1,
                                                                            generator=generator)], dim=1)
    detected = np.full((len(views) * lights_per_view, N_DENSE, 2), np.nan)
    projections = np.zeros((len(views) * lights_per_view, 3, 4))
    frontal = int(np.argmin([abs(y) + abs(p) for y, p in views]))
    on_surface = None
    try:
        for v, (yaw, pitch) in enumerate(views):
            for j in range(lights_per_view):
                n = v * lights_per_view + j
                image, triangle_id, screen, projections[n] = render_mean_face(
                    model, yaw, pitch_degrees=pitch, roll_degrees=float(rolls[v, j]), sh=lights[v, j],
                    background=None if j == 0 else textured_backgrounds(1, 512, generator)[0],
                    return_projection=True)
                faces = analyzer.analyze(image)
                if not faces:
                    continue
                detected[n] = faces[0].landmarks478[:N_DENSE, :2]
                if v == frontal and j == 0:
                    points_xy = detected[n].astype(np.float64)
                    points_xy[oval] = outline_points(points_xy[oval], points_xy.mean(axis=0), triangle_id, screen,
                                                     model)
                    on_surface = _backproject(points_xy, triangle_id, screen, model)
    finally:
        if own:
            analyzer.close()
    if on_surface is None:
        raise FaceModelError("the detector found no face in the rendered mean face; dense embedding unavailable")
    points = triangulate(detected, projections)
    points[oval] = on_surface[oval]
    untriangulated = np.isnan(points).any(axis=1)
    points[untriangulated] = on_surface[untriangulated]
    missing = np.isnan(points).any(axis=1)
    if missing.any():
        raise FaceModelError(f"{int(missing.sum())} dense landmarks could not be placed on the surface")
    shape = model.mean_shape.astype(np.float64)
    triangle, bary, _ = closest_points_on_mesh(points, shape, model.triangles)
    triangle, bary = _attach_inner_lips(points, shape, model.triangles, triangle, bary)
    corners = shape[model.triangles[triangle]]  # (L, 3, 3)
    closest = (corners * bary[:, :, None]).sum(axis=1)
    frames = triangle_frames(torch.as_tensor(corners)).numpy()  # (L, 3, 3)
    offset = np.einsum("lij,lj->li", frames, points - closest)
    return dataclasses.replace(model, attributes={**model.attributes, "dense_embedding": str(EMBEDDING_VERSION)},
                               dense_triangle=triangle.astype(np.int32),
                               dense_barycentric=bary.astype(np.float32), dense_offset=offset.astype(np.float32))
