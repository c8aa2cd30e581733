"""Sparsity of tables row-sharded over torch.distributed (process groups, DTensor with Shard(0)): the global
block top-k as a distributed radix select, each rank writing its own rows of the single-process mask.
See sharded.py for the protocol and its failure semantics."""
from .sharded import ShardedDataNormSparsifier, sharded_block_norm_mask

__all__ = ["ShardedDataNormSparsifier", "sharded_block_norm_mask"]
