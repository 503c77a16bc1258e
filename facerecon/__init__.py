"""facerecon: textured 3D face meshes from folders of ordinary face photos."""

__version__ = "0.1.0"
