"""The KV cache on the engine side: the block pool and its managers (prefix caching), KV sizing,
FP8 scales, and the connectors that move blocks in and out of the engine (host tier,
disaggregated prefill/decode). A model family declares its cache layout (models/kv_spec.py);
everything here reads it from there."""
