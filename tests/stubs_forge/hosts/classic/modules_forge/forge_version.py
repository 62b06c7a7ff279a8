"""Forge Classic's version string, as in modules_forge/forge_version.py at 1f95d717."""
version = "classic"
