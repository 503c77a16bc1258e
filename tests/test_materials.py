"""Paper 002's specular material on the export side: MTL / GLB materials, UV baking,
de-lighting and the decomposition strip."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from facerecon.export.meshio import (
    SPECULAR_COLOR_FACTOR,
    TexturedMesh,
    roughness_from_shininess,
    write_glb,
    write_mesh,
    write_obj,
)
from facerecon.export.overlay import decomposition_strip
from facerecon.export import texture
from facerecon.export.texture import MIN_IRRADIANCE, bake_vertex_values, delight_texture


# --------------------------------------------------------------------------- fixtures

def _grid(n: int = 7, uv_lo: float = 0.0, uv_hi: float = 1.0):
    """A bumpy (n x n) grid: vertices (mm), triangles, uv (one per vertex) and triangle_uv."""
    s, t = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    vertices = np.stack([s.ravel() * 120 - 60, t.ravel() * 150 - 75, 20 * np.sin(3 * s.ravel()) + 5 * t.ravel()],
                        axis=1).astype(np.float32)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel(), idx[1:, :-1].ravel()
    triangles = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    uv = (uv_lo + (uv_hi - uv_lo) * np.stack([s.ravel(), t.ravel()], 1)).astype(np.float32)
    return vertices, triangles, uv, triangles.copy()


def _image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8)


def _mesh(specular: bool = True, photo: bool = True, shininess: float = 20.0) -> TexturedMesh:
    vertices, triangles, uv, triangle_uv = _grid()
    # a seam: the last column of triangles takes its own copy of the uv coordinates
    uv = np.concatenate([uv, uv[triangle_uv[-6:]].reshape(-1, 2)])
    triangle_uv[-6:] = len(uv) - 18 + np.arange(18).reshape(6, 3)
    colors = np.random.default_rng(3).integers(0, 256, (len(vertices), 3)).astype(np.uint8)
    extra = dict(diffuse_texture=_image(1), specular_texture=_image(2, 16), shininess=shininess) if specular else {}
    return TexturedMesh(vertices, triangles, uv, triangle_uv, colors, _image(0) if photo else None, **extra)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------- TexturedMesh / OBJ

def test_mesh_without_specular_writes_the_lambertian_mtl(tmp_path):
    written = write_obj(_mesh(specular=False), tmp_path / "face.obj")
    assert [p.name for p in written] == ["face.obj", "face_texture.png", "face.mtl"]
    assert (tmp_path / "face.mtl").read_text() == (
        "newmtl face\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\nmap_Kd face_texture.png\n")
    assert not list(tmp_path.glob("*_diffuse.png")) and not list(tmp_path.glob("*_specular.png"))


@pytest.mark.parametrize("missing", ["diffuse_texture", "specular_texture", "shininess"])
def test_part_of_the_specular_material_is_refused(tmp_path, missing):
    mesh = _mesh()
    setattr(mesh, missing, None)
    for writer in (write_obj, write_glb):
        with pytest.raises(ValueError, match="go together"):
            writer(mesh, tmp_path / "face.x")


def test_bad_shininess_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shininess"):
        write_obj(_mesh(shininess=float("nan")), tmp_path / "face.obj")
    with pytest.raises(ValueError, match="shininess"):
        write_glb(_mesh(shininess=-1.0), tmp_path / "face.glb")


def test_obj_with_specular_is_a_blinn_phong_material(tmp_path):
    import trimesh

    mesh = _mesh(shininess=37.5)
    written = write_obj(mesh, tmp_path / "face.obj")
    names = [p.name for p in written]
    assert names == ["face.obj", "face_texture.png", "face_diffuse.png", "face_specular.png", "face.mtl"]
    assert all(p.is_file() for p in written)
    lines = (tmp_path / "face.mtl").read_text().splitlines()
    assert "# photo texture: face_texture.png" in lines
    for line in ("newmtl face", "Kd 1 1 1", "Ks 1 1 1", "Ns 37.5", "illum 2", "map_Kd face_diffuse.png",
                 "map_Ks face_specular.png"):
        assert line in lines
    assert not any(line.startswith("map_Kd") and "texture" in line for line in lines)
    np.testing.assert_array_equal(_png(tmp_path / "face_texture.png"), mesh.texture)
    np.testing.assert_array_equal(_png(tmp_path / "face_diffuse.png"), mesh.diffuse_texture)
    np.testing.assert_array_equal(_png(tmp_path / "face_specular.png"), mesh.specular_texture)
    loaded = trimesh.load(tmp_path / "face.obj", process=False)
    material = loaded.visual.material
    np.testing.assert_array_equal(np.asarray(material.image.convert("RGB")), mesh.diffuse_texture)
    assert material.glossiness == pytest.approx(37.5)
    assert len(loaded.faces) == len(mesh.triangles)


def test_obj_with_specular_and_no_photo_texture(tmp_path):
    written = write_obj(_mesh(photo=False), tmp_path / "face.obj")
    assert [p.name for p in written] == ["face.obj", "face_diffuse.png", "face_specular.png", "face.mtl"]
    assert "# photo texture" not in (tmp_path / "face.mtl").read_text()


# --------------------------------------------------------------------------- GLB

def _parse_glb(data: bytes):
    """Check the GLB container and every index in the JSON; returns (document, binary chunk)."""
    assert len(data) % 4 == 0
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_length, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A and json_length % 4 == 0
    document = json.loads(data[20:20 + json_length].decode("utf-8"))
    bin_start = 20 + json_length
    bin_length, bin_type = struct.unpack_from("<II", data, bin_start)
    assert bin_type == 0x004E4942 and bin_length % 4 == 0
    assert bin_start + 8 + bin_length == len(data)
    binary = data[bin_start + 8:]
    assert document["asset"]["version"] == "2.0"
    (buffer,) = document["buffers"]
    assert "uri" not in buffer and buffer["byteLength"] <= bin_length < buffer["byteLength"] + 4
    for view in document["bufferViews"]:
        assert view["buffer"] == 0
        assert view["byteOffset"] % 4 == 0
        assert 0 < view["byteLength"] and view["byteOffset"] + view["byteLength"] <= buffer["byteLength"]
    sizes = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}
    components = {5126: 4, 5125: 4, 5123: 2}
    for accessor in document["accessors"]:
        view = document["bufferViews"][accessor["bufferView"]]
        element = sizes[accessor["type"]] * components[accessor["componentType"]]
        assert accessor.get("byteOffset", 0) + accessor["count"] * element <= view["byteLength"]
        assert (view.get("byteOffset", 0) + accessor.get("byteOffset", 0)) % components[accessor["componentType"]] == 0
    for image in document["images"]:
        assert image["mimeType"] == "image/png" and 0 <= image["bufferView"] < len(document["bufferViews"])
    for texture in document["textures"]:
        assert 0 <= texture["source"] < len(document["images"])
        assert 0 <= texture.get("sampler", 0) < len(document.get("samplers", [{}]))
    return document, binary


def _accessor(document, binary, index) -> np.ndarray:
    accessor = document["accessors"][index]
    view = document["bufferViews"][accessor["bufferView"]]
    dtype = {5126: "<f4", 5125: "<u4", 5123: "<u2"}[accessor["componentType"]]
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[accessor["type"]]
    start = view["byteOffset"] + accessor.get("byteOffset", 0)
    return np.frombuffer(binary, dtype, accessor["count"] * width, start).reshape(accessor["count"], width)


def _view_bytes(document, binary, index) -> bytes:
    view = document["bufferViews"][index]
    return binary[view["byteOffset"]:view["byteOffset"] + view["byteLength"]]


def test_glb_with_specular_carries_khr_materials_specular(tmp_path):
    import trimesh

    mesh = _mesh(shininess=30.0)
    assert write_glb(mesh, tmp_path / "face.glb") == [tmp_path / "face.glb"]
    document, binary = _parse_glb((tmp_path / "face.glb").read_bytes())
    assert document["extensionsUsed"] == ["KHR_materials_specular"]
    assert "extensionsRequired" not in document  # viewers without it still show the mesh
    assert len(document["images"]) == 2 and len(document["textures"]) == 2
    (material,) = document["materials"]
    pbr = material["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0
    assert pbr["roughnessFactor"] == pytest.approx((2.0 / 32.0) ** 0.25)
    specular = material["extensions"]["KHR_materials_specular"]
    assert specular["specularFactor"] == 1.0
    assert specular["specularColorFactor"] == [SPECULAR_COLOR_FACTOR] * 3
    diffuse_image = document["textures"][pbr["baseColorTexture"]["index"]]["source"]
    specular_image = document["textures"][specular["specularColorTexture"]["index"]]["source"]
    for image_index, expected in ((diffuse_image, mesh.diffuse_texture), (specular_image, mesh.specular_texture)):
        png = _view_bytes(document, binary, document["images"][image_index]["bufferView"])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), expected)

    (primitive,) = document["meshes"][0]["primitives"]
    assert primitive["material"] == 0 and primitive.get("mode", 4) == 4
    positions = _accessor(document, binary, primitive["attributes"]["POSITION"])
    normals = _accessor(document, binary, primitive["attributes"]["NORMAL"])
    texcoords = _accessor(document, binary, primitive["attributes"]["TEXCOORD_0"])
    indices = _accessor(document, binary, primitive["indices"]).ravel()
    position_accessor = document["accessors"][primitive["attributes"]["POSITION"]]
    assert position_accessor["min"] == positions.min(0).tolist()
    assert position_accessor["max"] == positions.max(0).tolist()
    n_split = len(np.unique(np.stack([mesh.triangles.ravel(), mesh.triangle_uv.ravel()], 1), axis=0))
    assert len(positions) == len(normals) == len(texcoords) == n_split > len(mesh.vertices)  # seams split
    assert len(indices) == 3 * len(mesh.triangles) and indices.max() < n_split
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    # metres, and each corner keeps its position and (top-left origin) texture coordinate
    corners = indices.reshape(-1, 3)
    np.testing.assert_allclose(positions[corners], mesh.vertices[mesh.triangles] / 1000.0, atol=1e-7)
    expected_uv = mesh.uv[mesh.triangle_uv] * [1, -1] + [0, 1]
    np.testing.assert_allclose(texcoords[corners], expected_uv, atol=1e-6)

    loaded = trimesh.load(tmp_path / "face.glb", force="mesh", process=False)
    assert len(loaded.vertices) == n_split and len(loaded.faces) == len(mesh.triangles)
    np.testing.assert_allclose(loaded.bounds, np.array([mesh.vertices.min(0), mesh.vertices.max(0)]) / 1000.0,
                               atol=1e-6)
    base = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
    np.testing.assert_array_equal(base, mesh.diffuse_texture)
    assert loaded.visual.material.roughnessFactor == pytest.approx(pbr["roughnessFactor"])


def test_glb_without_specular_keeps_the_plain_pbr_material(tmp_path):
    write_mesh(_mesh(specular=False), tmp_path / "face", ["glb"])
    document, _ = _parse_glb((tmp_path / "face.glb").read_bytes())
    assert "KHR_materials_specular" not in json.dumps(document)
    assert len(document["images"]) == 1


def test_roughness_follows_the_blinn_phong_exponent():
    assert roughness_from_shininess(0.0) == pytest.approx(1.0)
    # alpha = roughness**2 matches Ns = 2 / alpha**2 - 2
    for ns in (5.0, 20.0, 100.0, 1000.0):
        alpha = roughness_from_shininess(ns) ** 2
        assert 2.0 / alpha ** 2 - 2.0 == pytest.approx(ns)
    values = [roughness_from_shininess(ns) for ns in (1, 10, 100, 1000)]
    assert values == sorted(values, reverse=True) and 0 < values[-1] < values[0] <= 1


_NODE_VALIDATOR = """
const v = require('gltf-validator');
const data = new Uint8Array(require('fs').readFileSync(process.argv[1]));
v.validateBytes(data).then(r => { console.log(JSON.stringify(r.issues)); })
  .catch(e => { console.error(String(e)); process.exit(2); });
"""


def test_glb_passes_the_khronos_validator_when_present(tmp_path):
    """The official glTF validator is not on PyPI; it is an npm package. Runs when node
    finds ``gltf-validator`` (e.g. NODE_PATH=/path/to/node_modules), else skips."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    probe = subprocess.run([node, "-e", "require.resolve('gltf-validator')"], capture_output=True,
                           env=os.environ.copy())
    if probe.returncode != 0:
        pytest.skip("the npm package gltf-validator is not installed")
    write_glb(_mesh(), tmp_path / "face.glb")
    result = subprocess.run([node, "-e", _NODE_VALIDATOR, str(tmp_path / "face.glb")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    issues = json.loads(result.stdout)
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"]


# --------------------------------------------------------------------------- baking

def _texel_uv(size: int) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    return (cols + 0.5) / size, 1.0 - (rows + 0.5) / size


def test_constant_bakes_to_a_constant():
    vertices, triangles, uv, triangle_uv = _grid(uv_lo=0.2, uv_hi=0.7)
    values = np.tile([[0.25, 0.5, 0.75]], (len(vertices), 1))
    image, covered = bake_vertex_values(triangles, uv, triangle_uv, values, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    assert covered.shape == (64, 64) and covered.dtype == bool
    u, v = _texel_uv(64)
    inside = (u > 0.2) & (u < 0.7) & (v > 0.2) & (v < 0.7)
    np.testing.assert_array_equal(covered, inside)  # no texel centre lies on the border here
    np.testing.assert_allclose(image[covered], np.broadcast_to([0.25, 0.5, 0.75], image[covered].shape), atol=1e-6)
    np.testing.assert_allclose(image, np.broadcast_to([0.25, 0.5, 0.75], image.shape), atol=1e-6)  # holes filled


def test_linear_function_of_uv_bakes_to_itself():
    vertices, triangles, uv, triangle_uv = _grid(n=5, uv_lo=0.05, uv_hi=0.95)
    coefficients = np.array([[0.7, -0.2, 1.5], [0.1, 0.9, -0.5]])  # (2, C): value = uv @ coefficients + offset
    offset = np.array([0.05, 0.0, 0.3])
    values = uv.astype(np.float64) @ coefficients + offset
    image, covered = bake_vertex_values(triangles, uv, triangle_uv, values, 50)
    u, v = _texel_uv(50)
    expected = np.stack([u, v], -1) @ coefficients + offset
    assert covered.sum() > 0.7 * covered.size
    np.testing.assert_allclose(image[covered], expected[covered], atol=1e-5)


def test_bake_takes_torch_values_and_one_channel():
    vertices, triangles, uv, triangle_uv = _grid(n=4)
    values = torch.as_tensor(uv[:, :1] * 2.0)
    image, covered = bake_vertex_values(torch.as_tensor(triangles), torch.as_tensor(uv),
                                        torch.as_tensor(triangle_uv), values, 32)
    assert image.shape == (32, 32, 1) and covered.all()
    u, _ = _texel_uv(32)
    np.testing.assert_allclose(image[..., 0], 2 * u, atol=1e-5)
    with pytest.raises(ValueError, match="values"):
        bake_vertex_values(triangles, uv, triangle_uv, uv[:, 0], 8)


def test_bake_follows_the_uv_corners_across_a_seam():
    """Per-vertex values go through ``triangles``, positions in the texture through ``triangle_uv``."""
    # one quad (two triangles) whose uv island is mirrored left-right
    triangles = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # uv k is the mirror of vertex k
    values = np.array([[0.0], [1.0], [1.0], [0.0]])  # vertex value = 1 - u of its uv
    image, covered = bake_vertex_values(triangles, uv, triangles, values, 16)
    u, _ = _texel_uv(16)
    assert covered.all()
    np.testing.assert_allclose(image[..., 0], 1.0 - u, atol=1e-6)


def test_the_uv_layout_rasterised_in_the_background_is_the_one_the_texture_uses():
    """The fit stage rasterises the UV layout while the detector runs; the texture then takes it
    from the cache, and it is the layout rasterised on first use."""
    _, _, uv, triangle_uv = _grid(n=6, uv_lo=0.05, uv_hi=0.95)
    uv, triangle_uv = torch.as_tensor(uv, dtype=torch.float32), torch.as_tensor(triangle_uv, dtype=torch.int64)
    texture._UV_CACHE.clear()
    reference = texture._uv_fragments(uv.to(torch.float64), triangle_uv, 48)
    texture._UV_CACHE.clear()
    texture.rasterize_uv_layout_in_background(uv, triangle_uv, 48, torch.float64).join()
    background = texture._UV_CACHE["entry"][3]
    assert texture._uv_fragments(uv.to(torch.float64), triangle_uv, 48) is background
    assert torch.equal(background.triangle_id, reference.triangle_id)
    assert torch.equal(background.barycentric, reference.barycentric)


# --------------------------------------------------------------------------- de-lighting

def test_delight_recovers_the_albedo():
    rng = np.random.default_rng(0)
    t = 24
    albedo_u8 = rng.integers(0, 256, (t, t, 3)).astype(np.uint8)
    albedo = albedo_u8 / 255.0
    irradiance = rng.uniform(0.6, 1.4, (t, t, 3))
    irradiance = np.minimum(irradiance, 1.0 / np.maximum(albedo, 1e-3))  # the lit photo stays <= 1 ...
    specular = np.minimum(rng.uniform(0.0, 0.3, (t, t, 3)), 1.0 - albedo * irradiance)  # ... with the highlight
    photo = albedo * irradiance + specular
    assert photo.max() <= 1.0 + 1e-12
    photo_u8 = np.round(photo * 255).astype(np.uint8)
    fallback = rng.uniform(0, 1, (t, t, 3))
    out = delight_texture(photo_u8, irradiance, specular, fallback, np.ones((t, t)))
    assert out.shape == (t, t, 3) and out.dtype == np.uint8
    error = np.abs(out.astype(int) - albedo_u8.astype(int))
    assert error.max() <= 1  # photo quantisation / irradiance >= 0.6 is below one step

    unseen = delight_texture(photo_u8, irradiance, specular, fallback, np.zeros((t, t)))
    np.testing.assert_array_equal(unseen, np.round(fallback * 255).astype(np.uint8))
    half = delight_texture(photo_u8, irradiance, specular, fallback, np.full((t, t), 0.5))
    expected = 0.5 * albedo_u8 + 0.5 * np.round(fallback * 255)
    assert np.abs(half.astype(float) - expected).max() <= 1.0


def test_delight_clamps_dark_irradiance_and_bright_results():
    t = 8
    photo = np.full((t, t, 3), 200, np.uint8)
    irradiance = np.zeros((t, t, 3))
    irradiance[:, : t // 2] = 0.5  # left half: 200/255 / 0.5 > 1 -> clamped to 1
    specular = np.zeros((t, t, 3))
    specular[t // 2:] = 0.9  # bottom half: photo - specular < 0 -> clamped to 0 where irradiance is 0
    out = delight_texture(photo, irradiance, specular, np.zeros((t, t, 3)), np.ones((t, t)))
    assert np.all(out[: t // 2, : t // 2] == 255)
    assert np.all(out[: t // 2, t // 2:] == 255)  # (0.78 - 0) / MIN_IRRADIANCE: clamped, finite
    assert np.all(out[t // 2:, t // 2:] == 0)
    irradiance[:] = MIN_IRRADIANCE / 10
    out = delight_texture(np.full((t, t, 3), 1, np.uint8), irradiance, np.zeros((t, t, 3)),
                          np.zeros((t, t, 3)), np.ones((t, t)))
    assert np.all(out == round(255 * min(1.0, (1 / 255) / MIN_IRRADIANCE)))


def test_delight_checks_shapes():
    t = 4
    good = np.zeros((t, t, 3))
    with pytest.raises(ValueError, match="irradiance"):
        delight_texture(np.zeros((t, t, 3), np.uint8), np.zeros((t, t)), good, good, np.ones((t, t)))
    with pytest.raises(ValueError, match="seen"):
        delight_texture(np.zeros((t, t, 3), np.uint8), good, good, good, np.ones((t, t, 1)))


# --------------------------------------------------------------------------- decomposition strip

def test_decomposition_strip_pastes_renders_over_black():
    h, w = 96, 80
    rows, cols = np.mgrid[:h, :w]
    mask = (rows - 55) ** 2 + (cols - 40) ** 2 < 30 ** 2
    photo = np.random.default_rng(0).integers(1, 256, (h, w, 3)).astype(np.uint8)
    diffuse = np.full((h, w, 3), 0.6, np.float32)
    specular = np.full((h, w, 3), 0.2, np.float32)
    final = np.clip(diffuse + specular, 0, 1)
    strip = decomposition_strip(photo, diffuse, specular, final, mask)
    assert strip.shape == (h, 4 * w, 3) and strip.dtype == np.uint8
    below_labels = np.zeros((h, w), bool)
    below_labels[h // 3:] = True
    panels = [strip[:, k * w:(k + 1) * w] for k in range(4)]
    np.testing.assert_array_equal(panels[0][below_labels], photo[below_labels])
    for panel, render in zip(panels[1:], (diffuse, specular, final)):
        assert np.all(panel[~mask & below_labels] == 0)
        np.testing.assert_array_equal(panel[mask], np.round(render[mask] * 255).astype(np.uint8))
    assert panels[1][: h // 3].max() > 128  # a light label on the black background
    with pytest.raises(ValueError):
        decomposition_strip(photo, diffuse[:, :-1], specular, final, mask)
