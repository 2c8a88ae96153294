"""Training side of slm: TinyStories text → token files (``worker.data``), then the trainer."""
