"""Training the project's small CLIP-style model (issue 12); not imported by the service."""
