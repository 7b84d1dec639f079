"""bench: re-run, compare and tune four published residual-network runs on CIFAR."""

__version__ = "0.1.0"
