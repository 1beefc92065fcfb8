"""Nodes, the registry, the emulated network and the transports that reach nodes."""
