"""The supervisor: per node, it scales each function's pool of containers."""
