"""Training: losses, optimisers, train steps, sharding, checkpoints, data."""
