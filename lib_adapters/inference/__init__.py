"""One generation's adapter work, whatever the host: validated units, the runtime protocol, one module per
adapter family (T2I, style, IP) behind the family registry, the session that combines the runtimes at the
UNet's named points, and the caches that outlive a generation."""
