"""Marker of Forge Classic's ComfyUI-derived backend package."""
