"""The four pipeline stages and what they share."""
