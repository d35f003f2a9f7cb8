"""CPU-scale replications; each module is a ``fortify replicate <NAME>`` plugin."""
