"""The ``detect`` stage: photos in, faces with landmarks, aligned crops and masks out.

:func:`run_detect` is the whole batch (used by ``facerecon detect``): collect inputs,
load each image (in a background thread, one image ahead), find faces, align and crop
them, compute the skin attention and region masks, and store each image's results at
once in a crash-safe :class:`~facerecon.io.store.ResultStore`. :func:`analyze_image`
is the per-image work without any storage (used by the benchmark and by other stages).
The file layout is documented in docs/formats.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import h5py
import numpy as np

from facerecon import __version__
from facerecon.detection.align import (DEFAULT_CROP_SIZE, alignment_matrix, transform_points, valid_mask,
                                       warp_crop)
from facerecon.detection.masks import region_masks
from facerecon.detection.mediapipe_backend import DetectedFace, FaceAnalyzer
from facerecon.detection.skin import DEFAULT_SKIN_PRIOR, skin_attention_image
from facerecon.errors import InputError
from facerecon.io.background import Background
from facerecon.io.images import (DEFAULT_MAX_PIXELS, ImageLoadError, LoadedImage, collect_inputs, load_image,
                                 read_bytes, sha256_hex)
from facerecon.io.store import ResultStore, attrs_dict, open_results

KIND = "detections"
ITEMS_GROUP = "images"
FORMAT_VERSION = 1

STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"
DONE_STATUSES = (STATUS_OK, STATUS_NO_FACE)


@dataclass
class DetectOptions:
    """Settings of a detect run (the result-changing ones are stored with every image).

    Attributes:
        crop_size: side of the aligned crops.
        min_score: minimum detector confidence.
        max_faces: keep at most this many faces per image, largest first (None: all).
        detect_max_side: long side the image is reduced to for detection.
        tile_size: detection tile side (0: no tiling).
        max_pixels: refuse larger images.
        skin_prior: P(skin) of the skin posterior.
        overwrite: redo images already stored.
        pack_interval: seconds between periodic packs of the output.
        compression: gzip level for crops and masks (level 1: photos barely compress
            losslessly at any level, so the fastest is used).
        second_look: when the full-range detector finds no face in a photo, look again with
            mediapipe's short-range model (close-ups, half profiles, partly covered faces;
            docs/detection.md has the real-photo numbers behind this default).
    """

    crop_size: int = DEFAULT_CROP_SIZE
    min_score: float = 0.5
    max_faces: int | None = None
    detect_max_side: int = 2560
    tile_size: int = 640
    max_pixels: int = DEFAULT_MAX_PIXELS
    skin_prior: float = DEFAULT_SKIN_PRIOR
    overwrite: bool = False
    pack_interval: float = 60.0
    compression: int = 1
    second_look: bool = True

    def make_analyzer(self) -> FaceAnalyzer:
        return FaceAnalyzer(min_score=self.min_score, max_faces=self.max_faces,
                            detect_max_side=self.detect_max_side, tile_size=self.tile_size,
                            short_range_fallback=self.second_look)


@dataclass
class FaceResult:
    """One face with everything derived on the aligned crop.

    Attributes:
        face: the detection (original-image pixels).
        matrix: (2, 3) float64 original pixel -> crop pixel similarity transform.
        crop: (S, S, 3) uint8 aligned crop.
        crop_landmarks478: (478, 3) float32 landmarks in crop pixels (z scaled alike).
        crop_landmarks68: (68, 2) float32.
        skin_attention: (S, S) uint8, attention A times 255.
        masks: name -> (S, S) uint8 {0, 255}: face, eyes, brows, lips, inner_mouth, valid.
    """

    face: DetectedFace
    matrix: np.ndarray
    crop: np.ndarray
    crop_landmarks478: np.ndarray
    crop_landmarks68: np.ndarray
    skin_attention: np.ndarray
    masks: dict[str, np.ndarray]


def analyze_image(analyzer: FaceAnalyzer, rgb: np.ndarray, crop_size: int = DEFAULT_CROP_SIZE,
                  skin_prior: float = DEFAULT_SKIN_PRIOR) -> list[FaceResult]:
    """Detect, align, crop and mask every face of an (H, W, 3) uint8 image (largest first)."""
    results = []
    h, w = rgb.shape[:2]
    for face in analyzer.analyze(rgb):
        m = alignment_matrix(face.points5, crop_size)
        crop = warp_crop(rgb, m, crop_size)
        lm_crop = transform_points(face.landmarks478, m)
        masks = region_masks(lm_crop, crop_size)
        masks["valid"] = valid_mask(m, (w, h), crop_size)
        attention = skin_attention_image(crop, skin_prior)
        results.append(FaceResult(
            face=face, matrix=m, crop=crop, crop_landmarks478=lm_crop,
            crop_landmarks68=transform_points(face.landmarks68, m),
            skin_attention=np.round(attention * 255.0).astype(np.uint8), masks=masks))
    return results


# --------------------------------------------------------------------------- outcomes


@dataclass
class ImageOutcome:
    """What happened to one input."""

    key: str
    path: str
    status: str               # ok | no_face | failed | skipped
    faces: int = 0
    reason: str = ""
    seconds: float = 0.0


@dataclass
class DetectSummary:
    """Result of a batch (``to_dict`` is what ``--json`` prints)."""

    output: str
    outcomes: list[ImageOutcome] = field(default_factory=list)
    elapsed: float = 0.0
    interrupted: bool = False
    error: str = ""

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def faces(self) -> int:
        return sum(o.faces for o in self.outcomes if o.status == STATUS_OK)

    @property
    def succeeded(self) -> int:
        """Images with a result: faces found, no face found, or already done."""
        return sum(1 for o in self.outcomes if o.status in (STATUS_OK, STATUS_NO_FACE, STATUS_SKIPPED))

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.succeeded > 0 else 1

    def to_dict(self) -> dict[str, Any]:
        processed = self.count(STATUS_OK) + self.count(STATUS_NO_FACE)
        return {
            "output": self.output, "images": len(self.outcomes), "processed": processed,
            "skipped": self.count(STATUS_SKIPPED), "with_faces": self.count(STATUS_OK), "faces": self.faces,
            "no_face": self.count(STATUS_NO_FACE), "failed": self.count(STATUS_FAILED),
            "elapsed_seconds": round(self.elapsed, 3),
            "images_per_second": round(processed / self.elapsed, 3) if self.elapsed > 0 else None,
            "interrupted": self.interrupted, "error": self.error, "exit_code": self.exit_code,
            "failures": [{"key": o.key, "path": o.path, "reason": o.reason}
                         for o in self.outcomes if o.status == STATUS_FAILED],
            "results": [asdict(o) for o in self.outcomes],
        }


class Progress:
    """Callbacks of :func:`run_detect` (the default does nothing)."""

    def start(self, total: int) -> None:  # noqa: D401 - callback
        pass

    def advance(self, outcome: ImageOutcome) -> None:
        pass


# --------------------------------------------------------------------------- storage


def run_settings(options: DetectOptions, analyzer: FaceAnalyzer) -> dict[str, Any]:
    """Result-changing settings (stored per image; a change makes resume redo the image)."""
    settings = analyzer.settings()
    settings.update({"crop_size": options.crop_size, "skin_prior": options.skin_prior,
                     "skin_model": "jones-rehg-16-kernel-rgb-gmm", "alignment": "5-point similarity, template v1",
                     "format_version": FORMAT_VERSION})
    return settings


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_faces(group: h5py.Group, faces: Sequence[FaceResult], compression: int) -> None:
    packed = {"compression": "gzip", "compression_opts": compression}
    faces_group = group.create_group("faces")
    for index, result in enumerate(faces):
        g = faces_group.create_group(str(index))
        f = result.face
        g.attrs["index"] = index
        g.attrs["score"] = float(f.score)
        g.create_dataset("box", data=f.box.astype(np.float32))
        g.create_dataset("landmarks478", data=f.landmarks478.astype(np.float32))
        g.create_dataset("landmarks68", data=f.landmarks68.astype(np.float32))
        g.create_dataset("points5", data=f.points5.astype(np.float32))
        g.create_dataset("pose_degrees", data=f.pose_degrees.astype(np.float32))
        g.create_dataset("detector_keypoints", data=f.detector_keypoints.astype(np.float32))
        g.create_dataset("align_matrix", data=result.matrix.astype(np.float64))
        g.create_dataset("crop", data=result.crop, chunks=result.crop.shape, **packed)
        g.create_dataset("crop_landmarks478", data=result.crop_landmarks478.astype(np.float32))
        g.create_dataset("crop_landmarks68", data=result.crop_landmarks68.astype(np.float32))
        g.create_dataset("skin_attention", data=result.skin_attention, chunks=result.skin_attention.shape, **packed)
        masks = g.create_group("masks")
        for name, mask in result.masks.items():
            masks.create_dataset(name, data=mask, chunks=mask.shape, **packed)


def _image_attrs(key: str, path: Path, loaded: LoadedImage | None, status: str, n_faces: int,
                 settings: dict, digest: str, sha256: str = "", file_size: int = 0, error: str = "",
                 seconds: float = 0.0) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "key": key, "source_path": os.path.abspath(path), "source_name": path.name, "status": status,
        "n_faces": n_faces, "sha256": loaded.sha256 if loaded else sha256, "file_size": loaded.file_size if loaded
        else file_size, "tool": "facerecon", "tool_version": __version__, "settings": settings,
        "settings_digest": digest, "processed_at": _now(), "seconds": round(seconds, 4), "error": error,
    }
    if loaded is not None:
        attrs.update({"image_width": loaded.width, "image_height": loaded.height,
                      "stored_width": loaded.stored_width, "stored_height": loaded.stored_height,
                      "exif_orientation": loaded.exif_orientation, "format": loaded.format,
                      "source_mode": loaded.source_mode, "had_alpha": loaded.had_alpha})
    return attrs


# --------------------------------------------------------------------------- batch


@dataclass
class _Prepared:
    key: str
    path: Path
    status: str                   # "load" | skipped | failed
    loaded: LoadedImage | None = None
    reason: str = ""
    sha256: str = ""
    file_size: int = 0
    seconds: float = 0.0


def _prepare(path: Path, key: str, done: dict[str, str], options: DetectOptions) -> _Prepared:
    """Read, hash, and (unless already done) decode one input. Runs in the loader thread."""
    started = time.perf_counter()
    sha, size = "", 0
    try:
        data = read_bytes(path)
        sha, size = sha256_hex(data), len(data)
        if not options.overwrite and done.get(key) == sha:
            return _Prepared(key, path, STATUS_SKIPPED, sha256=sha, file_size=size)
        loaded = load_image(path, data=data, sha256=sha, max_pixels=options.max_pixels)
        del data
        return _Prepared(key, path, "load", loaded=loaded, sha256=sha, file_size=size,
                         seconds=time.perf_counter() - started)
    except ImageLoadError as exc:
        reason = str(exc)
    except MemoryError:
        reason = "not enough memory to load the image"
    return _Prepared(key, path, STATUS_FAILED, reason=reason, sha256=sha, file_size=size,
                     seconds=time.perf_counter() - started)


def _prefetched(items: Sequence[tuple[Path, str]], done: dict[str, str], options: DetectOptions,
                should_stop: Callable[[], bool] | None = None) -> Iterator[_Prepared | None]:
    """Yield prepared inputs in order, loading the next one (in a daemon thread) while the
    caller works. Yields None and ends when ``should_stop()`` turns true during a wait, so a
    Ctrl-C never waits for a long decode (a second one raises KeyboardInterrupt at once)."""
    if not items:
        return
    pending = Background(_prepare, items[0][0], items[0][1], done, options, name="facerecon-load")
    for index in range(len(items)):
        while not pending.wait(0.05):
            if should_stop is not None and should_stop():
                yield None
                return
        current = pending.result()
        if index + 1 < len(items):
            path, key = items[index + 1]
            pending = Background(_prepare, path, key, done, options, name="facerecon-load")
        yield current


def run_detect(inputs: Iterable[str | os.PathLike], output: str | os.PathLike,
               options: DetectOptions | None = None, progress: Progress | None = None,
               analyzer: FaceAnalyzer | None = None,
               should_stop: Callable[[], bool] | None = None,
               exclude: Sequence[str | os.PathLike] = ()) -> DetectSummary:
    """Run detection over ``inputs`` (files, folders, globs) into ``output``.

    Raises:
        facerecon.io.store.StoreLockedError: another process writes ``output``.
        facerecon.io.store.StoreError: ``output`` exists and is not a detections file.
    ``exclude``: folders whose files folders and globs in ``inputs`` do not contribute (an
    output folder inside an input folder). ``should_stop()`` is polled before each image; when it returns True, or on a
    KeyboardInterrupt, the batch stops, completed images are packed into ``output`` and
    the summary comes back with ``interrupted=True``.
    """
    options = options or DetectOptions()
    if not 0.0 < options.skin_prior < 1.0:  # NaN fails too: one clear error, not every image failed
        raise InputError(f"skin prior must be between 0 and 1 (exclusive), not {options.skin_prior}")
    if not 0.0 <= options.min_score <= 1.0:
        raise InputError(f"minimum detection score must be between 0 and 1, not {options.min_score}")
    progress = progress or Progress()
    output = Path(output)
    started = time.perf_counter()
    summary = DetectSummary(output=str(output))
    collected = collect_inputs(inputs, exclude=exclude)
    for argument, reason in collected.problems:
        summary.outcomes.append(ImageOutcome(key=argument, path=argument, status=STATUS_FAILED, reason=reason))

    own_analyzer = analyzer is None
    analyzer = analyzer or options.make_analyzer()
    settings = run_settings(options, analyzer)
    digest = settings_digest(settings)
    file_attrs = {"tool": "facerecon", "tool_version": __version__, "format_version": FORMAT_VERSION,
                  "settings": settings}
    try:
        with ResultStore(output, kind=KIND, items_group=ITEMS_GROUP, file_attrs=file_attrs,
                         pack_interval=options.pack_interval) as store:
            done = {key: attrs.get("sha256", "") for key, attrs in store.index.items()
                    if attrs.get("status") in DONE_STATUSES and attrs.get("settings_digest") == digest}
            progress.start(len(collected))
            try:
                with contextlib.closing(_prefetched(list(collected), done, options, should_stop)) as prepared_items:
                    for prepared in prepared_items:
                        if prepared is None or (should_stop is not None and should_stop()):
                            summary.interrupted = True
                            break
                        outcome = _process_one(prepared, analyzer, options, store, settings, digest)
                        summary.outcomes.append(outcome)
                        progress.advance(outcome)
                        store.maybe_pack()
            except KeyboardInterrupt:
                summary.interrupted = True
    finally:
        if own_analyzer:
            analyzer.close()
        summary.elapsed = time.perf_counter() - started
    return summary


def _process_one(prepared: _Prepared, analyzer: FaceAnalyzer, options: DetectOptions, store: ResultStore,
                 settings: dict, digest: str) -> ImageOutcome:
    key, path = prepared.key, prepared.path
    if prepared.status == STATUS_SKIPPED:
        attrs = store.item_attrs(key) or {}
        return ImageOutcome(key, str(path), STATUS_SKIPPED, faces=int(attrs.get("n_faces", 0) or 0),
                            reason="already done (same SHA-256)")
    if prepared.status == STATUS_FAILED:
        store.write_item(key, None, _image_attrs(key, path, None, STATUS_FAILED, 0, settings, digest,
                                                 sha256=prepared.sha256, file_size=prepared.file_size,
                                                 error=prepared.reason, seconds=prepared.seconds))
        return ImageOutcome(key, str(path), STATUS_FAILED, reason=prepared.reason, seconds=prepared.seconds)
    loaded = prepared.loaded
    started = time.perf_counter()
    try:
        faces = analyze_image(analyzer, loaded.rgb, options.crop_size, options.skin_prior)
    except Exception as exc:  # noqa: BLE001 - one odd image must not end the batch
        reason = f"detection failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        store.write_item(key, None, _image_attrs(key, path, loaded, STATUS_FAILED, 0, settings, digest,
                                                 error=reason))
        return ImageOutcome(key, str(path), STATUS_FAILED, reason=reason)
    status = STATUS_OK if faces else STATUS_NO_FACE
    seconds = prepared.seconds + time.perf_counter() - started
    attrs = _image_attrs(key, path, loaded, status, len(faces), settings, digest, seconds=seconds)
    store.write_item(key, lambda group: _write_faces(group, faces, options.compression), attrs)
    return ImageOutcome(key, str(path), status, faces=len(faces), seconds=seconds,
                        reason="" if faces else "no face found")


# --------------------------------------------------------------------------- reading


@dataclass
class StoredFace:
    """One face read back from a detections file (see docs/formats.md for the fields)."""

    index: int
    score: float
    arrays: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["arrays"][name]
        except KeyError:
            raise AttributeError(name) from None


def read_faces(group: h5py.Group) -> list[StoredFace]:
    """All faces of one image group, in index order."""
    faces = []
    container = group.get("faces")
    if container is None:
        return faces
    for name in sorted(container, key=int):
        g = container[name]
        arrays = {k: g[k][()] for k in g if isinstance(g[k], h5py.Dataset)}
        masks = {k: g["masks"][k][()] for k in g["masks"]} if "masks" in g else {}
        faces.append(StoredFace(int(g.attrs["index"]), float(g.attrs["score"]), arrays, masks))
    return faces


def iter_detections(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any], list[StoredFace]]]:
    """Yield ``(key, image attributes, faces)`` for every image of a detections file
    (including images still in leftover shards)."""
    with open_results(path, ITEMS_GROUP) as results:
        for key, group in results.items():
            yield key, attrs_dict(group), read_faces(group)

