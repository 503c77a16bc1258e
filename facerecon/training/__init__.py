"""Training of the regression networks (R-Net) with the self-supervised hybrid loss."""
