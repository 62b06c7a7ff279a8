"""Training methods: what is trained and how it is written for the rest of the ecosystem."""
