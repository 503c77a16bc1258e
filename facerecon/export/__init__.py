"""Writing reconstructions: mesh files, UV textures, overlays and contact sheets."""
