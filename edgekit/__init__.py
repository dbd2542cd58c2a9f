"""edgekit: take a PyTorch model and its data to embedded devices."""

__version__ = "0.1.0"
