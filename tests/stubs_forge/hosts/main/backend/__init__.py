"""Marker of Forge main's own backend package (the real one replaced ldm_patched)."""
