"""Where adapters meet the UNet: the named site table, the named points and the interface a host binding drives,
the A1111 binding (reversible forward wrappers and weight patches)."""
