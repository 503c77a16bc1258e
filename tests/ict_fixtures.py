"""Build a miniature ICT-FaceKit checkout (OBJ files + vertex_indices.json) from the archive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _write_obj(path: Path, vertices: np.ndarray, uv=None, polygons=None, polygon_uv=None, materials=None) -> None:
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    if uv is not None:
        lines += [f"vt {u:.6f} {v:.6f}" for u, v in uv]
        current = None
        for poly, puv, mat in zip(polygons, polygon_uv, materials):
            if mat != current:
                lines.append(f"usemtl {mat}")
                current = mat
            lines.append("f " + " ".join(f"{a + 1}/{b + 1}" for a, b in zip(poly, puv)))
    path.write_text("\n".join(lines) + "\n")


def write_mini_checkout(npz_path: Path, root: Path, n_identity: int = 3, n_expression: int = 2) -> Path:
    """Write ``root/FaceXModel`` with the neutral mesh, a few identity and expression OBJs."""
    data = np.load(npz_path)
    facex = root / "FaceXModel"
    facex.mkdir(parents=True)
    neutral = data["neutral"]
    _write_obj(facex / "generic_neutral_mesh.obj", neutral, data["uv"], data["polygons"], data["polygon_uv"],
               data["polygon_material"])
    for i in range(n_identity):
        _write_obj(facex / f"identity{i:03d}.obj", neutral + data["identity_modes"][i])
    names = [str(n) for n in data["expression_names"][:n_expression]]
    for k, name in enumerate(names):
        _write_obj(facex / f"{name}.obj", neutral + data["expression_modes"][k])
    config = {"expressions": names, "idx_to_landmark_verts": data["landmarks68"].tolist(),
              "idx_to_rigid_landmark_idx": [0, 36, 39, 42, 45, 16, 28, 31, 35]}
    (facex / "vertex_indices.json").write_text(json.dumps(config))
    return root
