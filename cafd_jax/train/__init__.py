"""Training: pure, jitted train steps and the epoch loops around them."""
