"""Where adapters meet the UNet: the named site table and reversible forward wrappers."""
