"""Speculative decoding: proposers that guess each row's next k tokens, and the verifier that
scores them in one target step (jaxserve/spec_decode/rejection_sampler.py).

This package's `__init__` and `config` import no jax: `jaxserve.config` reads the option's parser.
"""
