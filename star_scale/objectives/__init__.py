"""ST-AR's losses, one small module each: tensors in, scalar (and metrics) out."""
