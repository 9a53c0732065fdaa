"""Audio plugin: RVQ / GRVQ / FSQ codec quantizers and post-training quantization of a codec's weights."""
