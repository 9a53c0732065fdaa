"""polyquant diffusion plugin: FP4DiT post-training quantization of diffusers transformers."""
