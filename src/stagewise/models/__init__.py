"""Neural networks: the torch posterior model (embedding + normalizing flow)."""
