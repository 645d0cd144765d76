"""Built-in datasets: procedurally generated image-caption data needing no downloads."""
