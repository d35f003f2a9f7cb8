"""Small shared helpers: devices, seeding, atomic file writes, logging."""
