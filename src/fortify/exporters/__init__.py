"""``fortify export <kind>`` plugins: fortify checkpoints → other tools' layouts."""
