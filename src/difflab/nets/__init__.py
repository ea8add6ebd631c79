"""Networks only: no sampling, no data."""
