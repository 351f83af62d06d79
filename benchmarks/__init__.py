"""Scripts that print figures (speed, memory); never asserted in tests."""
