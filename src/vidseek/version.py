"""The vidseek version, in a leaf module: code that records it (checkpoints, stores, reports)
imports it from here, not from the package root, whose lazy re-exports reach the top layers."""
__version__ = "0.1.0"
