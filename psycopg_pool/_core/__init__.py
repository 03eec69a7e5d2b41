"""The I/O-free pool core. See state.py."""
