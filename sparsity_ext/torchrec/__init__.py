"""Sparsity for TorchRec models (optional extra: `pip install .[torchrec]`; see the README's set-up).

TorchRecSparsifier / sparsify_torchrec find the embedding tables of EmbeddingBagCollection,
EmbeddingCollection, FusedEmbeddingBagCollection, FBGEMM TBE modules and DistributedModelParallel-sharded
collections (every sharding type) and give each table DataNormSparsifier's mask of the whole table, in place.
Importing sparsity_ext never imports this package (nor torchrec).
"""
from .sparsifier import TorchRecSparsifier, sparsify_torchrec

__all__ = ["TorchRecSparsifier", "sparsify_torchrec"]
