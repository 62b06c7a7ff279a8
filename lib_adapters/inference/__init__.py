"""One generation's adapter work: validated units, T2I features, schedules, the session."""
