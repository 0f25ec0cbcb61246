"""Byte units: every figure in GB means bytes / 2**30 (GiB)."""
GB = float(1 << 30)
