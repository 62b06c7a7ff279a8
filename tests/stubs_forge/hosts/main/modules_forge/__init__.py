"""Marker of the Forge family for the host tests (the real package holds Forge's WebUI additions)."""
