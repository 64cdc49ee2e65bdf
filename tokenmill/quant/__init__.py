"""Quantized weights computed natively: formats, packing, quantizers, the reference matmul."""
