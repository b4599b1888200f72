"""Distributed training: process layout, tensor parallelism, the DeepSpeed engine, the sharded teacher, checkpoints.

- ``layout``: process groups (megatron.core.parallel_state) from ``parallel.tp`` and the world size.
- ``mpu``: the adapter DeepSpeed needs to tell tensor-parallel from data-parallel ranks.
- ``tensor_parallel``: the GPT's layer factory (megatron-core parallel layers at TP > 1),
  vocab-parallel cross-entropy, and sharding/unsharding of full (TP = 1) weights.
- ``ds_config``: the DeepSpeed JSON generated from a recipe (a raw JSON may override it).
- ``engine``: ``DeepSpeedEngine``, the LocalEngine interface on top of DeepSpeed ZeRO.
- ``sharded_teacher``: the EMA teacher partitioned exactly like the student.
- ``checkpoint``: atomic per-rank checkpoints (optionally written by a thread), resumable on any layout;
  ``pieces`` (what each rank holds, and back), ``shard_files`` (the format, and resharding; torch only).
- ``whole_state``: the whole TP = 1 state in memory (tests, earlier-format checkpoints); ``export``.

Importing this package imports DeepSpeed and megatron-core; the single-process
path (star_scale.train.local_engine) never does.
"""
