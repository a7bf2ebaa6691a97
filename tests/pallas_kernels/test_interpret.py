"""`interpret_mode()`: the Pallas kernels the dispatch picks run in interpret mode inside the block,
in the thread (or copied context) that entered it only."""

import concurrent.futures
import contextvars
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention
from pallas_kernels.interpret import interpret_mode, interpreting
from tests.pallas_kernels.test_ragged_paged_attention import make_batch

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


def test_the_block_sets_and_restores_the_flag():
    assert not interpreting()
    with interpret_mode():
        assert interpreting()
        with interpret_mode():
            assert interpreting()
        assert interpreting()  # the inner block restores the outer one's value
    assert not interpreting()
    with pytest.raises(RuntimeError), interpret_mode():
        raise RuntimeError("a failing check")
    assert not interpreting()


def test_other_threads_keep_their_own_flag():
    seen = {}
    with interpret_mode():
        thread = threading.Thread(target=lambda: seen.setdefault("thread", interpreting()))
        thread.start()
        thread.join()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            seen["copied"] = pool.submit(contextvars.copy_context().run, interpreting).result()
    assert seen == {"thread": False, "copied": True}
    started, release = threading.Event(), threading.Event()

    def interpreting_thread():
        with interpret_mode():
            started.set()
            release.wait(10)

    other = threading.Thread(target=interpreting_thread)
    other.start()
    started.wait(10)
    assert not interpreting()  # another thread's block leaves this one alone
    release.set()
    other.join()


def test_the_dispatch_reads_it_while_tracing():
    rng = np.random.default_rng(3)
    q, k, v, lens, tables, cu = make_batch(rng, [1, 3], [9, 20], num_kv_heads=1, group=2, head_dim=64, block_size=16)
    args = [jnp.asarray(a) for a in (q, k, v, lens, tables, cu)] + [jnp.int32(2)]
    with interpret_mode():  # no interpret=True: on CPU the Triton kernel runs only interpreted
        kernel = ragged_paged_attention(*args, sm_scale=0.125, backend="triton")
    reference = ragged_paged_attention(*args, sm_scale=0.125, backend="reference")
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(reference), rtol=1e-4, atol=1e-5)
