"""Forge main's version string, as in modules_forge/forge_version.py at dfdcbab6."""
version = "2.0.1v1.10.1"
