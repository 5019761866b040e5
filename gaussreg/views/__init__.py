"""What is shown of runs: the fair table (report), figures (plot), exports and the live view."""
