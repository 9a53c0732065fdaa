"""Plugin ``gaussians``: compression of 3D Gaussian Splatting scenes (OMG sub-vector quantization)."""
