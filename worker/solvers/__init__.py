"""Per-row scheduler updates for continuous batching: each row at its own step, with its own history."""
