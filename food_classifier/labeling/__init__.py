"""`food-classifier label DIR`: a loopback page to label the photos `serve --keep-photos DIR` kept."""
