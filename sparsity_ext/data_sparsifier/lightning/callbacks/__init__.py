"""Lightning callbacks: `data_sparsity.PostTrainingDataSparsity` and `data_sparsity.TrainingAwareDataSparsity`.

Import them from `sparsity_ext.data_sparsifier.lightning.callbacks.data_sparsity`; that import needs
`lightning` (or `pytorch_lightning`) and raises ImportError without it. This package itself imports
without either.
"""
