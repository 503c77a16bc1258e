"""Analysis-by-synthesis fitting of face-model parameters to detected faces."""
