"""The CPU decode engine, applied to a loaded model from outside it: see decoder.py."""
from mistral.cpu.decoder import CpuDecoder

__all__ = ["CpuDecoder"]
