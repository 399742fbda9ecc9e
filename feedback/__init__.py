"""Human feedback loop: interaction log, ratings and corrections, export to training data."""
