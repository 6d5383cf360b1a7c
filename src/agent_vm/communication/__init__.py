"""Host side of the control channel (and, later, workspace sharing)."""
