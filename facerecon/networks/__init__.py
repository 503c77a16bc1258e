"""Neural networks: face-recognition backbone for the perceptual loss (and, later, R-Net)."""
