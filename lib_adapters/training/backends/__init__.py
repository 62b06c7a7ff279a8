"""Model backends: one interface over a loaded ldm/sgm model (the WebUI's) or diffusers components."""
