"""Attention kernels that replace torch SDPA on some devices, each registering itself in mistral.attention.KERNELS."""
