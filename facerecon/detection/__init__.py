"""Face detection, landmarks, alignment, skin and region masks.

Modules: :mod:`~facerecon.detection.mediapipe_backend` (detector + 478-point mesh),
:mod:`~facerecon.detection.landmarks` (68/5-point tables), :mod:`~facerecon.detection.pose`,
:mod:`~facerecon.detection.align` (similarity alignment, crops),
:mod:`~facerecon.detection.skin` (skin posterior and attention),
:mod:`~facerecon.detection.masks` (region masks). See docs/detection.md.
"""
