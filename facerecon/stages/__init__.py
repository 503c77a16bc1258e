"""Batch stages (detect, fit, ...): thin orchestration over the library modules.

Importing the package registers :func:`facerecon.stages.model_install.fetch_and_install_ict`
as the default model fetcher of :mod:`facerecon.facemodel.resolve` (which must not import
the stages, whose calibration runs the fitter).
"""

from facerecon.facemodel import resolve as _resolve
from facerecon.stages import model_install as _model_install

_resolve.default_fetcher = _model_install.fetch_and_install_ict
