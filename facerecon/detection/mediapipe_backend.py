"""Face detection and 478-point face mesh with mediapipe's bundled models.

Pipeline of :meth:`FaceAnalyzer.analyze` for one RGB image:

1. **Detection** with mediapipe's full-range face detector (``model_selection=1``, the
   model meant for faces at up to about 5 m, i.e. small faces and group photos). The
   image is first reduced so its long side is at most ``detect_max_side``. The detector
   sees its input at 192x192, so faces below about 1/17 of the image side are missed; when
   the (reduced) image is larger than ``tile_size`` it is additionally scanned in
   overlapping ``tile_size`` tiles, which finds faces down to about 40 px in a 1920x1080
   photo. Detections are merged by non-maximum suppression. Optionally
   (``short_range_fallback``, off by default), when this finds nothing the short-range
   detector (``model_selection=0``, meant for faces filling much of the frame) gets a second
   look at the whole image: it finds strongly turned faces the full-range model misses
   (``benchmarks/detect_yaw.py``: random ICT faces with a mesh, 135 -> 147 of 168 over yaw
   -80..80), but also half-covered faces whose landmarks are guesses (docs/detection.md).
2. **Mesh** per detection: a square crop around the face (``mesh_crop_scale`` times the
   box side) is cut from the *full-resolution* image, resized to ``mesh_input_size`` and
   given to mediapipe's FaceMesh (``static_image_mode=True, refine_landmarks=True``, 478
   points with irises). The mesh face nearest the crop centre is kept; when none is found
   the crop is retried at other scales; a detection without a mesh is dropped.
3. Landmarks are mapped back to original pixels; x, y in pixels, z is mediapipe's relative
   depth (the same scale as x, origin near the head centre, growing away from the camera)
   converted to pixels. The iBUG 68 points, five alignment points and a head pose follow
   from them (:mod:`facerecon.detection.landmarks`, :mod:`facerecon.detection.pose`).

Faces are returned largest first (detector box area). mediapipe graphs are not
thread-safe: use one analyzer per process (or per thread, never shared).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from facerecon.detection.align import warp_crop
from facerecon.detection.landmarks import N_REFINED, landmarks68, points5_from_68
from facerecon.detection.pose import head_pose

DETECTOR_NAME = "mediapipe-face-detection-full-range+face-mesh-478"
SHORT_RANGE_DETECTOR = "mediapipe-face-detection-short-range"


@dataclass
class DetectedFace:
    """One face found in an image (all coordinates in original-image pixels).

    Attributes:
        box: (4,) float32 x0, y0, x1, y1 of the detector box, clipped to the image.
        score: detector confidence in [0, 1].
        landmarks478: (478, 3) float32 x, y pixels and z relative depth in pixels.
        landmarks68: (68, 2) float32 iBUG 68 points (:data:`~facerecon.detection.landmarks.IBUG68_FROM_MP478`).
        points5: (5, 2) float32 eye centres, nose tip, mouth corners.
        pose_degrees: (3,) float32 pitch, yaw, roll (:mod:`facerecon.detection.pose`).
        detector_keypoints: (6, 2) float32 the detector's own points (eyes, nose tip,
            mouth centre, ear tragions).
    """

    box: np.ndarray
    score: float
    landmarks478: np.ndarray
    landmarks68: np.ndarray
    points5: np.ndarray
    pose_degrees: np.ndarray
    detector_keypoints: np.ndarray = field(default_factory=lambda: np.zeros((6, 2), np.float32))

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


@dataclass
class Detection:
    """A detector box before meshing.

    Attributes:
        box: (4,) float64 x0, y0, x1, y1 in pixels of the image it refers to.
        score: detector confidence.
        keypoints: (6, 2) float64 the detector's points, same frame.
    """

    box: np.ndarray
    score: float
    keypoints: np.ndarray


@contextlib.contextmanager
def _native_stderr_silenced(enabled: bool = True):
    """Send file descriptor 2 to /dev/null (mediapipe's C++ start-up chatter)."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _box_iou_and_cover(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(a[2] - a[0], 0) * max(a[3] - a[1], 0)
    area_b = max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
    union = area_a + area_b - inter
    smaller = min(area_a, area_b)
    return (inter / union if union > 0 else 0.0), (inter / smaller if smaller > 0 else 0.0)


def non_max_suppression(detections: list[Detection], iou: float = 0.3, cover: float = 0.7) -> list[Detection]:
    """Keep the best-scoring of overlapping detections (IoU above ``iou``, or the smaller box
    covered more than ``cover`` by the other)."""
    kept: list[Detection] = []
    for det in sorted(detections, key=lambda d: -d.score):
        if not any(_overlaps(det, k, iou, cover) for k in kept):
            kept.append(det)
    return kept


def _overlaps(a: Detection, b: Detection, iou: float, cover: float) -> bool:
    i, c = _box_iou_and_cover(a.box, b.box)
    return i > iou or c > cover


#: Longest side the detector graph is ever given (the whole-image pass is reduced to it).
WHOLE_PASS_MAX_SIDE = 4096


def tile_origins(width: int, height: int, tile: int, overlap: float = 0.25) -> list[tuple[int, int]]:
    """Top-left corners of ``tile`` x ``tile`` windows covering a ``width`` x ``height`` image
    with at least ``overlap`` (fraction) between neighbours."""
    step = max(1, int(tile * (1.0 - overlap)))

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        out = list(range(0, n - tile + 1, step))
        if out[-1] + tile < n:
            out.append(n - tile)
        return out

    return [(x, y) for y in starts(height) for x in starts(width)]


class FaceAnalyzer:
    """Detect faces and fit the 478-point mesh (see the module notes).

    Args:
        min_score: minimum detector confidence.
        max_faces: keep at most this many faces (largest first); None keeps all.
        detect_max_side: reduce the image to this long side before detection (crops and
            meshes still use full resolution).
        tile_size: side of the detection tiles (pixels of the reduced image); 0 disables
            tiling.
        tile_overlap: overlap between neighbouring tiles, as a fraction of ``tile_size``.
        mesh_crop_scale: side of the mesh crop relative to the detector box side.
        mesh_input_size: side the mesh crop is resized to.
        quiet: silence mediapipe's native start-up messages on stderr.
        short_range_fallback: when the full-range detector finds no face, look again with the
            short-range one (off by default, see the module notes).

    Use as a context manager or call :meth:`close`. Graphs are created on first use.
    """

    def __init__(self, min_score: float = 0.5, max_faces: int | None = None, *, detect_max_side: int = 2560,
                 tile_size: int = 640, tile_overlap: float = 0.25, mesh_crop_scale: float = 2.0,
                 mesh_input_size: int = 256, quiet: bool = True, short_range_fallback: bool = False):
        if not 0.0 <= min_score <= 1.0:
            raise ValueError("min_score must be in [0, 1]")
        if max_faces is not None and max_faces < 1:
            raise ValueError("max_faces must be at least 1 (or None for all)")
        self.min_score = float(min_score)
        self.max_faces = max_faces
        self.detect_max_side = int(detect_max_side)
        self.tile_size = int(tile_size)
        self.tile_overlap = float(tile_overlap)
        self.mesh_crop_scale = float(mesh_crop_scale)
        self.mesh_input_size = int(mesh_input_size)
        self.quiet = quiet
        self.short_range_fallback = bool(short_range_fallback)
        self._detector = None
        self._short_range = None
        self._mesh = None
        self._mesh_has_run = False

    # ----------------------------------------------------------------- lifecycle
    def settings(self) -> dict:
        """The settings that influence results (stored with every output)."""
        import mediapipe

        settings = {
            "detector": DETECTOR_NAME, "mediapipe_version": getattr(mediapipe, "__version__", "?"),
            "face_detection_model_selection": 1, "min_score": self.min_score,
            "max_faces": self.max_faces if self.max_faces is not None else 0,
            "detect_max_side": self.detect_max_side, "tile_size": self.tile_size, "tile_overlap": self.tile_overlap,
            "mesh_crop_scale": self.mesh_crop_scale, "mesh_input_size": self.mesh_input_size,
            "refine_landmarks": True,
        }
        if self.short_range_fallback:  # only when on: stores made without it keep their digest
            settings["fallback_detector"] = SHORT_RANGE_DETECTOR
        return settings

    def open(self) -> "FaceAnalyzer":
        """Create the mediapipe graphs now (otherwise done on first use)."""
        if self._detector is not None:
            return self
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with _native_stderr_silenced(self.quiet):
            from mediapipe.python.solutions import face_detection, face_mesh

            self._detector = face_detection.FaceDetection(model_selection=1,
                                                          min_detection_confidence=self.min_score)
            if self.short_range_fallback:
                self._short_range = face_detection.FaceDetection(model_selection=0,
                                                                 min_detection_confidence=self.min_score)
            self._mesh = face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=2,
                                            min_detection_confidence=0.3)
            blank = np.zeros((64, 64, 3), dtype=np.uint8)  # first runs print more chatter
            for graph in (self._detector, self._short_range, self._mesh):
                if graph is not None:
                    graph.process(blank)
        return self

    def close(self) -> None:
        for graph in (self._detector, self._short_range, self._mesh):
            if graph is not None:
                with contextlib.suppress(Exception):
                    graph.close()
        self._detector = None
        self._short_range = None
        self._mesh = None

    def __enter__(self) -> "FaceAnalyzer":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- analysis
    def analyze(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        """Find faces in an RGB image.

        Args:
            image_rgb: (H, W, 3) uint8 RGB (a (H, W) grey image is accepted too).
        Returns:
            list of :class:`DetectedFace`, largest first, at most ``max_faces``.
        """
        image = _as_rgb8(image_rgb)
        self.open()
        h, w = image.shape[:2]
        if min(h, w) < 8:
            return []
        faces: list[DetectedFace] = []
        for det in self.detect(image):
            face = self._mesh_face(image, det)
            if face is None:
                continue
            if any(_box_iou_and_cover(_landmark_box(face.landmarks478), _landmark_box(f.landmarks478))[0] > 0.5
                   for f in faces):
                continue  # two detections of the same face
            faces.append(face)
            if self.max_faces is not None and len(faces) >= self.max_faces:
                break
        return faces

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Face boxes in original pixels, largest first (no mesh)."""
        import cv2

        h, w = image.shape[:2]
        scale = min(1.0, self.detect_max_side / max(h, w)) if self.detect_max_side > 0 else 1.0
        if scale < 1.0:
            small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        else:
            small = image
        sh, sw = small.shape[:2]
        view = _detector_view(small)  # reduced once for both whole-image looks
        found = self._run_detector(small, 0, 0, sw, sh, whole=True, view=view)
        if self.tile_size > 0 and max(sh, sw) > 1.25 * self.tile_size:
            tile = self.tile_size
            for x0, y0 in tile_origins(sw, sh, tile, self.tile_overlap):
                found.extend(self._run_detector(small[y0:y0 + tile, x0:x0 + tile], x0, y0, sw, sh, whole=False))
        if not found and self._short_range is not None:
            found = self._run_detector(small, 0, 0, sw, sh, whole=True, graph=self._short_range, view=view)
        kept = non_max_suppression(found)
        out = []
        for det in kept:
            box = det.box / scale
            box = np.array([max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(w)), min(box[3], float(h))])
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue
            out.append(Detection(box, det.score, det.keypoints / scale))
        out.sort(key=lambda d: -(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
        return out

    def _run_detector(self, image: np.ndarray, x0: int, y0: int, full_w: int, full_h: int,
                      whole: bool, graph=None, view: np.ndarray | None = None) -> list[Detection]:
        """Detections of ``graph`` (default: the full-range detector) in ``image``, a tile at
        (``x0``, ``y0``) of a ``full_w`` x ``full_h`` image or the whole of it, in that image's
        pixels. The graph is given ``view``, ``image`` as :func:`_detector_view` reduces it
        (made here when not given); its boxes are relative, so they map back to ``image``."""
        th, tw = image.shape[:2]
        if view is None:
            view = _detector_view(image)
        result = (graph or self._detector).process(np.ascontiguousarray(view))
        dets = []
        for d in result.detections or []:
            score = float(d.score[0]) if d.score else 0.0
            if score < self.min_score:
                continue
            rb = d.location_data.relative_bounding_box
            bx0, by0 = rb.xmin * tw, rb.ymin * th
            bx1, by1 = bx0 + rb.width * tw, by0 + rb.height * th
            if not whole:
                # A face cut by an inner tile edge is only partly seen; the neighbouring
                # tile (overlap) or the whole-image pass sees it whole.
                margin = 2.0
                cut = ((bx0 < margin and x0 > 0) or (by0 < margin and y0 > 0)
                       or (bx1 > tw - margin and x0 + tw < full_w) or (by1 > th - margin and y0 + th < full_h))
                if cut or max(bx1 - bx0, by1 - by0) > 0.5 * min(tw, th):
                    continue
            kps = np.array([[k.x * tw + x0, k.y * th + y0] for k in d.location_data.relative_keypoints],
                           dtype=np.float64).reshape(-1, 2)
            if kps.shape[0] != 6:
                kps = np.resize(kps, (6, 2)) if kps.size else np.zeros((6, 2))
            dets.append(Detection(np.array([bx0 + x0, by0 + y0, bx1 + x0, by1 + y0]), score, kps))
        return dets

    def _mesh_face(self, image: np.ndarray, det: Detection) -> DetectedFace | None:
        box = det.box
        cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
        side = max(box[2] - box[0], box[3] - box[1])
        size = self.mesh_input_size
        for factor in (1.0, 0.75, 1.4):
            crop_side = max(side * self.mesh_crop_scale * factor, 8.0)
            s = size / crop_side
            # original pixel -> crop pixel (pixel centres at integers)
            m = np.array([[s, 0.0, size / 2.0 - 0.5 - s * cx], [0.0, s, size / 2.0 - 0.5 - s * cy]])
            crop = warp_crop(image, m, size)
            # mediapipe logs one warning from C++ at the first mesh it projects; keep it
            # off the terminal like the start-up messages.
            with _native_stderr_silenced(self.quiet and not self._mesh_has_run):
                result = self._mesh.process(crop)
            if not result.multi_face_landmarks:
                continue
            self._mesh_has_run = True
            best, best_d = None, np.inf
            for face in result.multi_face_landmarks:
                pts = np.array([[p.x, p.y, p.z] for p in face.landmark], dtype=np.float64) * size
                if pts.shape[0] != N_REFINED:
                    continue
                centre = pts[:, :2].mean(axis=0)
                dist = np.hypot(centre[0] - (size - 1) / 2.0, centre[1] - (size - 1) / 2.0)
                if dist < best_d:
                    best, best_d = pts, dist
            if best is None or best_d > 0.25 * size:
                continue
            lm = np.empty((N_REFINED, 3), dtype=np.float64)
            lm[:, 0] = (best[:, 0] - m[0, 2]) / s
            lm[:, 1] = (best[:, 1] - m[1, 2]) / s
            lm[:, 2] = best[:, 2] / s
            lm32 = lm.astype(np.float32)
            p68 = landmarks68(lm32)
            return DetectedFace(
                box=box.astype(np.float32), score=det.score, landmarks478=lm32, landmarks68=p68,
                points5=points5_from_68(p68), pose_degrees=head_pose(lm),
                detector_keypoints=det.keypoints.astype(np.float32))
        return None


def _detector_view(image: np.ndarray) -> np.ndarray:
    """``image`` reduced to a long side of at most :data:`WHOLE_PASS_MAX_SIDE` (itself when not
    larger): the detector looks at 128-256 px; a larger input only risks the graph's own size
    limits (a 33000 px wide image aborts the process)."""
    import cv2

    h, w = image.shape[:2]
    if max(h, w) <= WHOLE_PASS_MAX_SIDE:
        return image
    s = WHOLE_PASS_MAX_SIDE / max(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _landmark_box(landmarks: np.ndarray) -> np.ndarray:
    p = np.asarray(landmarks)[:, :2]
    return np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()], dtype=np.float64)


def _as_rgb8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)
