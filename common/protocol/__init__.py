"""What server and client agree on: the table of methods, the run config, the per-round
instructions and the wire format."""
