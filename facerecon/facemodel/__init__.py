"""Face models: the on-disk format, importers, resolution and tensor evaluation."""

from facerecon.facemodel.model import FaceModel, FaceModelError, load_face_model, save_face_model

__all__ = ["FaceModel", "FaceModelError", "load_face_model", "save_face_model"]
