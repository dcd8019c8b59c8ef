"""Training data, one concern per module: `listings` (JSONL, CSV, folder), `images` (decode, convert,
crop, flip), `files` (the listed dataset and its epoch order), `buckets` (aspect-ratio buckets),
`latent_cache` (VAE posteriors computed once), `shards` (WebDataset streams), and `samples` (what all of
them share: seeded per-sample choices, bad samples, batches).

Bad data never crashes a run: unreadable/corrupt/zero-byte images and missing captions are skipped
and counted (`skipped` in each batch, summed in the log). An empty dataset or a wrong path is an error
before any work.
"""
from .buckets import BucketBatchSampler, bucket_sizes, image_size, nearest_bucket
from .files import EpochSampler, ImageTextDataset
from .images import open_rgb, to_rgb, transform
from .latent_cache import (CACHE_INDEX, LatentDataset, build_latent_cache, cache_matches, is_latent_cache,
                           shard_name)
from .listings import IMAGE_SUFFIXES, SIDE_WORDS, Item, list_items, sided_captions
from .samples import MAX_REPLACEMENTS, BadSample, collate, sample_seed, stable_key
from .shards import ShardStream, decode_record, list_shards, shard_records

__all__ = ["BadSample", "BucketBatchSampler", "CACHE_INDEX", "EpochSampler", "IMAGE_SUFFIXES", "ImageTextDataset",
           "Item", "LatentDataset", "MAX_REPLACEMENTS", "SIDE_WORDS", "ShardStream", "bucket_sizes",
           "build_latent_cache", "cache_matches", "collate", "decode_record", "image_size", "is_latent_cache",
           "list_items", "list_shards", "nearest_bucket", "open_rgb", "sample_seed", "shard_name", "shard_records",
           "sided_captions", "stable_key", "to_rgb", "transform"]
