"""Mesh files: OBJ + MTL + texture PNG, PLY with vertex colours, GLB (binary glTF).

All writers are atomic (temporary file + rename) and take millimetre vertices.

A mesh with paper 002's specular material (a de-lit diffuse albedo map, a specular albedo
map and a Blinn-Phong shininess) gets a Blinn-Phong MTL (``map_Kd`` = diffuse albedo,
``map_Ks`` = specular map) and a GLB whose material carries ``KHR_materials_specular``
(docs/formats.md, "Mesh files").
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facerecon.io.atomic import atomic_path, atomic_write_text

SUPPORTED_FORMATS = ("obj", "ply", "glb")


@dataclass
class TexturedMesh:
    """A mesh ready to write.

    vertices: (N, 3) float32 mm; triangles: (F, 3) int; uv: (T, 2) in [0, 1] (origin bottom-left);
    triangle_uv: (F, 3) int; vertex_colors: (N, 3) uint8; texture: (H, W, 3) uint8 RGB or None
    (the lit photo texture).

    Specular material (paper 002), all three or none:
    diffuse_texture: (H, W, 3) uint8 de-lit diffuse albedo in UV space;
    specular_texture: (H, W, 3) uint8 specular albedo map in UV space;
    shininess: Blinn-Phong exponent (>= 0).
    """

    vertices: np.ndarray
    triangles: np.ndarray
    uv: np.ndarray
    triangle_uv: np.ndarray
    vertex_colors: np.ndarray
    texture: np.ndarray | None = None
    diffuse_texture: np.ndarray | None = None
    specular_texture: np.ndarray | None = None
    shininess: float | None = None

    def has_specular_material(self) -> bool:
        """True when the mesh carries the specular material; ValueError when only part of it."""
        given = [self.diffuse_texture is not None, self.specular_texture is not None, self.shininess is not None]
        if not any(given):
            return False
        if not all(given):
            raise ValueError("diffuse_texture, specular_texture and shininess go together: give all three or none")
        if not (math.isfinite(float(self.shininess)) and float(self.shininess) >= 0):
            raise ValueError(f"shininess must be a finite number >= 0, not {self.shininess}")
        for name in ("diffuse_texture", "specular_texture"):
            image = getattr(self, name)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"{name} must be an (H, W, 3) uint8 image, not {image.shape} {image.dtype}")
        return True


def parse_formats(text: str) -> list[str]:
    """``"obj,ply"`` -> ``["obj", "ply"]``; raises ValueError naming an unknown format."""
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in SUPPORTED_FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown mesh format(s) {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(SUPPORTED_FORMATS)}")
    return list(dict.fromkeys(formats))


def _png_bytes(rgb: np.ndarray, name: str) -> bytes:
    """PNG encoding of an RGB uint8 image."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise OSError(f"cannot encode {name}")
    return data.tobytes()


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG atomically."""
    data = _png_bytes(rgb, Path(path).name)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def roughness_from_shininess(shininess: float) -> float:
    """glTF ``roughnessFactor`` for a Blinn-Phong exponent ``Ns``.

    The usual Blinn-Phong <-> microfacet match ``Ns = 2 / alpha**2 - 2`` gives
    ``alpha = sqrt(2 / (Ns + 2))``; glTF's roughness is the *perceptual* roughness whose
    square is ``alpha``, so ``roughness = (2 / (Ns + 2)) ** 0.25`` (Ns 0 -> 1, 20 -> 0.55,
    100 -> 0.37, 1000 -> 0.21).
    """
    return float((2.0 / (max(float(shininess), 0.0) + 2.0)) ** 0.25)


def write_obj(mesh: TexturedMesh, path: Path) -> list[Path]:
    """OBJ with UVs, an MTL and the texture PNG beside it. Returns the written paths.

    With a specular material the MTL is Blinn-Phong (``illum 2``): ``map_Kd`` is the de-lit
    diffuse albedo ``<stem>_diffuse.png`` (so a renderer relights it), ``map_Ks`` the
    specular map ``<stem>_specular.png`` and ``Ns`` the shininess; the lit photo texture is
    still written as ``<stem>_texture.png`` and named in a comment line of the MTL.
    """
    path = Path(path)
    specular = mesh.has_specular_material()
    stem = path.stem
    written = [path]
    header = f"# facerecon mesh, millimetres\nmtllib {stem}.mtl\nusemtl {stem}\n"
    faces = np.concatenate([mesh.triangles[:, :, None], mesh.triangle_uv[:, :, None]], axis=2).reshape(-1, 6) + 1
    body = io.StringIO()
    np.savetxt(body, mesh.vertices, fmt="v %.4f %.4f %.4f")
    np.savetxt(body, mesh.uv, fmt="vt %.6f %.6f")
    np.savetxt(body, faces, fmt="f %d/%d %d/%d %d/%d")
    atomic_write_text(path, header + body.getvalue())
    if specular:
        return written + _write_blinn_phong_mtl(mesh, path)
    mtl = [f"newmtl {stem}", "Ka 1 1 1", "Kd 1 1 1", "Ks 0 0 0", "d 1", "illum 1"]
    if mesh.texture is not None:
        texture_path = path.with_name(f"{stem}_texture.png")
        write_png(texture_path, mesh.texture)
        mtl.append(f"map_Kd {texture_path.name}")
        written.append(texture_path)
    atomic_write_text(path.with_suffix(".mtl"), "\n".join(mtl) + "\n")
    written.append(path.with_suffix(".mtl"))
    return written


def _write_blinn_phong_mtl(mesh: TexturedMesh, path: Path) -> list[Path]:
    """The textures and the Blinn-Phong MTL of a mesh with a specular material."""
    stem = path.stem
    written: list[Path] = []
    mtl = [f"newmtl {stem}", "Ka 1 1 1", "Kd 1 1 1", "Ks 1 1 1", f"Ns {float(mesh.shininess):.6g}", "d 1",
           "illum 2"]
    if mesh.texture is not None:
        texture_path = path.with_name(f"{stem}_texture.png")
        write_png(texture_path, mesh.texture)
        mtl.insert(0, f"# photo texture: {texture_path.name}")
        written.append(texture_path)
    for kind, key, image in (("diffuse", "map_Kd", mesh.diffuse_texture),
                             ("specular", "map_Ks", mesh.specular_texture)):
        image_path = path.with_name(f"{stem}_{kind}.png")
        write_png(image_path, image)
        mtl.append(f"{key} {image_path.name}")
        written.append(image_path)
    atomic_write_text(path.with_suffix(".mtl"), "\n".join(mtl) + "\n")
    written.append(path.with_suffix(".mtl"))
    return written


def write_ply(mesh: TexturedMesh, path: Path) -> list[Path]:
    """Binary little-endian PLY with per-vertex RGB colours."""
    n, f = len(mesh.vertices), len(mesh.triangles)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment facerecon mesh, millimetres\n"
        f"element vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {f}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode("ascii")
    vertex = np.zeros(n, dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    vertex["p"] = mesh.vertices
    vertex["c"] = mesh.vertex_colors
    face = np.zeros(f, dtype=[("n", "u1"), ("i", "<i4", 3)])
    face["n"] = 3
    face["i"] = mesh.triangles
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + vertex.tobytes() + face.tobytes())
    return [Path(path)]


def _split_seams(mesh: TexturedMesh) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One vertex per (position, uv) pair, as glTF needs: vertices, uv, colours, triangles."""
    pairs = np.stack([mesh.triangles.ravel(), mesh.triangle_uv.ravel()], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return (mesh.vertices[unique[:, 0]], mesh.uv[unique[:, 1]], mesh.vertex_colors[unique[:, 0]],
            inverse.reshape(-1, 3))


def write_glb(mesh: TexturedMesh, path: Path) -> list[Path]:
    """Binary glTF with the texture embedded and smooth vertex normals.

    glTF's unit is the metre, so GLB vertices are the millimetre vertices / 1000. A mesh
    with a specular material is written by :func:`_specular_glb` (trimesh cannot write
    ``KHR_materials_specular``); the others by trimesh.
    """
    import trimesh
    from PIL import Image

    from facerecon.facemodel.annotate import vertex_normals_np

    if mesh.has_specular_material():
        data = _specular_glb(mesh, Path(path).stem)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return [Path(path)]
    normals_full = vertex_normals_np(mesh.vertices.astype(np.float64), mesh.triangles)
    pairs = np.stack([mesh.triangles.ravel(), mesh.triangle_uv.ravel()], axis=1)
    unique = np.unique(pairs, axis=0)
    vertices, uv, colors, triangles = _split_seams(mesh)
    normals = normals_full[unique[:, 0]]
    if mesh.texture is not None:
        material = trimesh.visual.material.PBRMaterial(
            baseColorTexture=Image.fromarray(mesh.texture), metallicFactor=0.0, roughnessFactor=0.9)
        visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    else:
        visual = trimesh.visual.ColorVisuals(vertex_colors=colors)
    tm = trimesh.Trimesh(vertices=vertices / 1000.0, faces=triangles, visual=visual, process=False,
                         vertex_normals=normals)
    data = tm.export(file_type="glb")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return [Path(path)]


#: KHR_materials_specular's dielectric F0 is ``min(0.04 * specularColorFactor * specularColorTexture, 1)``
#: (default ior 1.5); this factor makes F0 the specular albedo map itself.
SPECULAR_COLOR_FACTOR = 25.0

# glTF constants
_FLOAT, _UNSIGNED_INT = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071
_GLB_MAGIC, _GLB_JSON, _GLB_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942


class _BinBuffer:
    """The GLB binary chunk being built: bufferViews, each starting on a 4-byte boundary."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.length = 0
        self.views: list[dict] = []

    def add(self, data: bytes, target: int | None = None) -> int:
        pad = -self.length % 4
        if pad:
            self.parts.append(b"\0" * pad)
            self.length += pad
        view = {"buffer": 0, "byteOffset": self.length, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        self.parts.append(data)
        self.length += len(data)
        self.views.append(view)
        return len(self.views) - 1

    def tobytes(self) -> bytes:
        return b"".join(self.parts) + b"\0" * (-self.length % 4)


def _glb_container(document: dict, binary: bytes) -> bytes:
    """GLB 2.0 file: 12-byte header, JSON chunk (space padded), BIN chunk (zero padded)."""
    text = json.dumps(document, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)
    binary += b"\0" * (-len(binary) % 4)
    total = 12 + 8 + len(text) + 8 + len(binary)
    return (struct.pack("<III", _GLB_MAGIC, 2, total) + struct.pack("<II", len(text), _GLB_JSON) + text
            + struct.pack("<II", len(binary), _GLB_BIN) + binary)


def _specular_glb(mesh: TexturedMesh, name: str) -> bytes:
    """GLB bytes of a mesh with a specular material (written without trimesh).

    One node, one primitive (POSITION in metres with min/max, NORMAL, TEXCOORD_0 with
    glTF's top-left UV origin, uint32 indices) and one material: baseColorTexture = the
    de-lit diffuse albedo, metallic 0, roughness :func:`roughness_from_shininess`, and
    ``KHR_materials_specular`` with the specular map as ``specularColorTexture`` (scaled by
    :data:`SPECULAR_COLOR_FACTOR` so F0 = the map). Both images are PNG bufferViews.
    """
    from facerecon.facemodel.annotate import vertex_normals_np

    normals_full = vertex_normals_np(mesh.vertices.astype(np.float64), mesh.triangles)
    pairs = np.stack([mesh.triangles.ravel(), mesh.triangle_uv.ravel()], axis=1)
    unique = np.unique(pairs, axis=0)
    vertices, uv, _, triangles = _split_seams(mesh)
    positions = np.ascontiguousarray(vertices / 1000.0, dtype="<f4")
    normals = normals_full[unique[:, 0]].astype(np.float64)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(length > 1e-6, normals / np.maximum(length, 1e-12), [0.0, 0.0, 1.0])  # glTF wants unit normals
    normals = np.ascontiguousarray(normals, dtype="<f4")
    texcoords = np.ascontiguousarray(np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1), dtype="<f4")
    indices = np.ascontiguousarray(triangles.ravel(), dtype="<u4")

    buffer = _BinBuffer()
    accessors = [
        {"bufferView": buffer.add(positions.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT,
         "count": len(positions), "type": "VEC3", "min": positions.min(0).tolist(), "max": positions.max(0).tolist()},
        {"bufferView": buffer.add(normals.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT,
         "count": len(normals), "type": "VEC3"},
        {"bufferView": buffer.add(texcoords.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT,
         "count": len(texcoords), "type": "VEC2"},
        {"bufferView": buffer.add(indices.tobytes(), _ELEMENT_ARRAY_BUFFER), "componentType": _UNSIGNED_INT,
         "count": len(indices), "type": "SCALAR"},
    ]
    images = [{"bufferView": buffer.add(_png_bytes(image, f"{name} {kind}")), "mimeType": "image/png",
               "name": f"{name}_{kind}"}
              for kind, image in (("diffuse", mesh.diffuse_texture), ("specular", mesh.specular_texture))]
    binary = buffer.tobytes()
    document = {
        "asset": {"version": "2.0", "generator": "facerecon"},
        "extensionsUsed": ["KHR_materials_specular"],
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": name}],
        "meshes": [{"name": name, "primitives": [{
            "attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2}, "indices": 3, "material": 0, "mode": 4}]}],
        "materials": [{
            "name": name,
            "pbrMetallicRoughness": {"baseColorTexture": {"index": 0}, "metallicFactor": 0.0,
                                     "roughnessFactor": roughness_from_shininess(mesh.shininess)},
            "extensions": {"KHR_materials_specular": {
                "specularFactor": 1.0, "specularColorFactor": [SPECULAR_COLOR_FACTOR] * 3,
                "specularColorTexture": {"index": 1}}},
        }],
        "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP_TO_EDGE,
                      "wrapT": _CLAMP_TO_EDGE}],
        "textures": [{"sampler": 0, "source": 0}, {"sampler": 0, "source": 1}],
        "images": images,
        "accessors": accessors,
        "bufferViews": buffer.views,
        "buffers": [{"byteLength": len(binary)}],
    }
    return _glb_container(document, binary)


def write_mesh(mesh: TexturedMesh, base: Path, formats: list[str]) -> list[Path]:
    """Write ``base.<fmt>`` for every format; returns every file written."""
    writers = {"obj": write_obj, "ply": write_ply, "glb": write_glb}
    written: list[Path] = []
    for fmt in formats:
        written += writers[fmt](mesh, Path(f"{base}.{fmt}"))
    return written
