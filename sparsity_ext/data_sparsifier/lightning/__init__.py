"""PyTorch Lightning integration of the data sparsifiers (needs `lightning` or `pytorch_lightning`)."""
