"""A run's story: resume what a killed run left, render batch by batch, write, report."""
