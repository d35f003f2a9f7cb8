"""Exchange formats with other robustness tools (RobustBench)."""
