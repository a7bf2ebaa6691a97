"""AsyncLLM on tiny random models: concurrent streams against requests run alone, stream
chunking, aborts (explicit, break, aclose, cancel), bad input, engine failures, shutdown."""

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest

from jaxserve import AsyncLLM
from jaxserve.sampling_params import SamplingParams
from tests.engine_utils import failing_steps, random_prompts, tiny_engine, tiny_loaded_model
from tests.jaxserve.test_engine import assert_same_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model()


@pytest.fixture
def make_llm(loaded):
    """AsyncLLM over a fresh tiny engine; every one is shut down after the test."""
    made = []

    def make(**options):
        made.append(AsyncLLM(engine=tiny_engine(loaded, **options)))
        return made[-1]

    yield make
    for llm in made:
        llm.shutdown()


def alone(loaded, requests, **options):
    """Reference: each request by itself on one synchronous engine, with top-2 logprobs."""
    engine = tiny_engine(loaded, **options)
    completions = []
    for prompt, params in requests:
        engine.add_request("ref", prompt, dataclasses.replace(params, logprobs=2))
        final = None
        while engine.has_unfinished_requests():
            final = next((o for o in engine.step() if o.finished), final)
        completions.append(final.outputs[0])
    return completions


async def collect(llm, prompt, params, request_id=None):
    return [out async for out in llm.generate(prompt, params, request_id)]


def joined(deltas):
    """(token ids, text, finish reasons) of a stream of single-completion deltas."""
    completions = [d.outputs[0] for d in deltas]
    return ([t for c in completions for t in c.token_ids], "".join(c.text for c in completions),
            [c.finish_reason for c in completions])


async def in_engine(llm, request_id):
    """Checked on the engine thread, between steps: does the engine still hold the request?"""
    engine = llm.engine
    return await llm._call(lambda: request_id in engine.scheduler.requests
                           or request_id in engine.kv_manager.req_to_blocks or request_id in engine.states)


async def idle_state(llm):
    """Once the engine has nothing left to do (the step after the last finish releases the
    finished requests' slots): KV usage, running, waiting, every slot free."""
    engine = llm.engine
    for _ in range(6000):
        if not await llm._call(engine.has_unfinished_requests):
            break
        await asyncio.sleep(0.01)
    return await llm._call(lambda: (engine.kv_cache_usage(), engine.num_running(), engine.num_waiting(),
                                    engine.runner.input_batch.num_free_slots == engine.config.max_num_reqs))


async def gone(llm, request_id):
    return not await in_engine(llm, request_id)


async def until(condition, timeout=60.0) -> bool:
    """Poll the coroutine `condition()` until it is true; False after `timeout` seconds, a bound
    only a test that fails anyway reaches (the wait is on the state, not on the time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_concurrent_streams_match_requests_alone(loaded, make_llm):
    """16 concurrent requests (8 run at a time, 64-token budget so long prompts are chunked):
    each stream's tokens are those of the request alone, and its deltas add up to its text."""
    rng = np.random.default_rng(1)
    requests = [(p, SamplingParams(max_tokens=int(rng.integers(1, 20)), **GREEDY))
                for p in random_prompts(rng, 16, 1, 120, 96)]
    llm = make_llm()

    async def main():
        return await asyncio.gather(*[collect(llm, p, params) for p, params in requests])

    streams = asyncio.run(main())
    for i, (deltas, ref) in enumerate(zip(streams, alone(loaded, requests))):
        token_ids, text, reasons = joined(deltas)
        assert_same_greedy(token_ids, ref.token_ids, ref.logprobs, f"request {i}")
        if token_ids == ref.token_ids:
            assert text == ref.text
        assert reasons == [None] * (len(deltas) - 1) + ["length"]
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert llm.num_running == llm.num_waiting == 0 and llm.kv_cache_usage == 0.0


@pytest.mark.parametrize("max_tokens, sizes", [(10, [1, 4, 4, 1]), (9, [1, 4, 4]), (1, [1])])
def test_stream_interval_sends_the_first_token_then_chunks(loaded, make_llm, max_tokens, sizes):
    llm = make_llm(stream_interval=4)
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    deltas = asyncio.run(collect(llm, [4, 5, 6], params))
    token_ids, text, reasons = joined(deltas)
    (ref,) = alone(loaded, [([4, 5, 6], params)])
    assert [len(d.outputs[0].token_ids) for d in deltas] == sizes
    assert reasons == [None] * (len(sizes) - 1) + ["length"]
    assert token_ids == ref.token_ids and text == ref.text


def test_explicit_abort_ends_the_stream_and_frees_blocks(loaded, make_llm):
    llm = make_llm()
    other_params = SamplingParams(max_tokens=30, **GREEDY)

    async def main():
        other = asyncio.create_task(collect(llm, [7, 8, 9], other_params))
        deltas = []
        async for out in llm.generate(list(range(2, 30)), SamplingParams(max_tokens=200, **GREEDY), "victim"):
            deltas.append(out)
            if len(deltas) == 3:
                await llm.abort("victim")
                assert not await in_engine(llm, "victim")  # blocks freed before the next step
        return deltas, await other, await idle_state(llm)

    deltas, other, idle = asyncio.run(main())
    # Deltas already queued when the abort landed still arrive; the last one says "abort".
    assert len(deltas) >= 4 and deltas[-1].finished
    assert joined(deltas)[2] == [None] * (len(deltas) - 1) + ["abort"]
    (ref,) = alone(loaded, [([7, 8, 9], other_params)])
    assert_same_greedy(joined(other)[0], ref.token_ids, ref.logprobs, "concurrent stream")
    assert joined(other)[2][-1] == "length"
    assert idle == (0.0, 0, 0, True)


@pytest.mark.parametrize("how", ["break", "aclose", "cancel"])
def test_consumer_leaving_aborts_the_request(loaded, make_llm, how):
    """The consumer breaks out, closes the generator, or its task is cancelled mid-stream: the
    request is gone from the engine before the next step, and a concurrent stream is unaffected."""
    llm = make_llm()
    other_params = SamplingParams(max_tokens=30, **GREEDY)
    victim = (list(range(2, 30)), SamplingParams(max_tokens=200, **GREEDY), "victim")

    async def consume(started: asyncio.Event):
        received = 0
        async for _ in llm.generate(*victim):
            received += 1
            started.set()
            if how == "break" and received == 2:
                break
        return received

    async def main():
        other = asyncio.create_task(collect(llm, [7, 8, 9], other_params))
        started = asyncio.Event()
        if how == "aclose":
            stream = llm.generate(*victim)
            await anext(stream)
            await stream.aclose()
        elif how == "break":
            assert await consume(started) == 2
            # The abandoned generator is closed by a task the loop creates (two iterations).
            for _ in range(2):
                await asyncio.sleep(0)
        else:
            task = asyncio.create_task(consume(started))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not await in_engine(llm, "victim")
        return await other, await idle_state(llm)

    other, idle = asyncio.run(main())
    (ref,) = alone(loaded, [([7, 8, 9], other_params)])
    assert_same_greedy(joined(other)[0], ref.token_ids, ref.logprobs, "concurrent stream")
    assert idle == (0.0, 0, 0, True)


def test_bad_input_raises_before_the_first_output_and_others_continue(make_llm):
    llm = make_llm()
    bad = [([], {}, "prompt"), ("", {}, "prompt"), ([3, 96], {}, "prompt_token_ids"),
           ([5] * 320, {}, "max_model_len"), ([3], dict(max_tokens=0), "max_tokens"),
           ([3], dict(temperature=float("nan")), "temperature"), ([3], dict(top_p=0.0), "top_p")]

    async def main():
        good = llm.generate([3, 4, 5], SamplingParams(max_tokens=20, **GREEDY), "good")
        first = await anext(good)
        for prompt, kwargs, field in bad:
            with pytest.raises(ValueError, match=field):
                await anext(llm.generate(prompt, SamplingParams(**kwargs)))
        with pytest.raises(ValueError, match="priority"):
            await anext(llm.generate([3], SamplingParams(), priority="high"))
        with pytest.raises(ValueError, match="request_id"):
            await anext(llm.generate([3], SamplingParams(), "good"))
        return [first] + [out async for out in good]

    deltas = asyncio.run(main())
    token_ids, _, reasons = joined(deltas)
    assert len(token_ids) == 20 and reasons[-1] == "length"


def test_a_failing_step_fails_its_streams_and_the_engine_goes_on(loaded, make_llm):
    llm = make_llm()
    params = SamplingParams(max_tokens=40, **GREEDY)

    async def main(failures):
        streams = [llm.generate([3 + i, 4], params) for i in range(2)]
        for stream in streams:
            await anext(stream)
        failures.append(True)
        for stream in streams:
            with pytest.raises(RuntimeError, match="device lost"):
                async for _ in stream:
                    pass
        after = await collect(llm, [7, 8, 9], params)
        return after, await idle_state(llm)

    with failing_steps(llm.engine.runner) as failures:
        after, idle = asyncio.run(main(failures))
    (ref,) = alone(loaded, [([7, 8, 9], params)])
    assert_same_greedy(joined(after)[0], ref.token_ids, ref.logprobs, "request after the failure")
    assert idle == (0.0, 0, 0, True)
    assert llm.is_running


def test_a_dead_loop_fails_every_stream(make_llm):
    """When even the cleanup after a failed step fails, the loop dies and says so to everyone."""
    llm = make_llm()
    engine = llm.engine

    def broken(*args, **kwargs):
        raise RuntimeError("engine corrupted")

    async def main():
        streams = [llm.generate([3 + i, 4], SamplingParams(max_tokens=40, **GREEDY)) for i in range(3)]
        for stream in streams:
            await anext(stream)
        await llm._call(lambda: vars(engine).update(step=broken, abort_request=broken))  # between steps
        for stream in streams:
            with pytest.raises(RuntimeError, match="engine corrupted"):
                async for _ in stream:
                    pass
        with pytest.raises(RuntimeError, match="died"):
            await anext(llm.generate([3], SamplingParams()))

    asyncio.run(main())
    llm._thread.join(timeout=5)
    assert not llm.is_running
    llm.shutdown()


def test_shutdown_aborts_streams_and_is_idempotent(loaded):
    async def main():
        async with AsyncLLM(engine=tiny_engine(loaded)) as llm:
            stream = llm.generate([3, 4], SamplingParams(max_tokens=200, **GREEDY))
            first = await anext(stream)
            await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)
            rest = [out async for out in stream]
        with pytest.raises(RuntimeError, match="shut down"):
            await anext(llm.generate([3], SamplingParams()))
        return llm, [first] + rest

    llm, deltas = asyncio.run(main())
    assert joined(deltas)[2][-1] == "abort" and deltas[-1].finished
    assert llm.engine.kv_cache_usage() == 0.0 and llm.kv_cache_usage == 0.0 and llm.num_running == 0
    llm.shutdown()
    with AsyncLLM(engine=tiny_engine(loaded)) as other:
        assert other.is_running
    other.shutdown()
    assert not llm.is_running and not other.is_running
    assert llm._thread not in threading.enumerate() and other._thread not in threading.enumerate()


def test_package_exports_async_llm():
    import jaxserve
    from jaxserve.async_llm import AsyncLLM as direct

    assert jaxserve.AsyncLLM is direct is AsyncLLM


def test_idle_loop_sleeps(make_llm):
    """With nothing to do the engine thread waits on its condition, with no timeout, instead of
    polling: it checks for work at most twice on its way to sleep and at most twice per wake-up
    that brings nothing (a bare notify here), and sleeps again without a timeout each time."""
    llm = make_llm()
    engine, wakeup = llm.engine, llm._wakeup
    checks, timeouts = [], []
    asleep = threading.Event()
    has_work, wait = engine.has_unfinished_requests, wakeup.wait

    def counted():
        checks.append(None)
        return has_work()

    def recorded_wait(timeout=None):
        timeouts.append(timeout)
        asleep.set()
        return wait(timeout)

    def instrument():
        engine.has_unfinished_requests = counted
        wakeup.wait = recorded_wait

    async def main():
        await collect(llm, [3, 4], SamplingParams(max_tokens=3, **GREEDY))
        await llm._call(instrument)  # on the engine thread, between steps: counted from here on

    asyncio.run(main())
    counts = []
    for _ in range(4):
        assert asleep.wait(60), "the idle engine thread never went to sleep on its condition"
        asleep.clear()
        # The thread holds the condition's lock until `wait` releases it: once we hold it, the
        # thread is asleep, and the notify reaches it.
        with wakeup:
            counts.append(len(checks))
            wakeup.notify()
    assert asleep.wait(60), "a bare wake-up did not put the engine thread back to sleep"
    with wakeup:
        counts.append(len(checks))
        assert timeouts == [None] * 5, timeouts  # nothing but a notify wakes it: no polling interval
    assert counts[0] <= 2, counts
    assert all(1 <= b - a <= 2 for a, b in zip(counts, counts[1:])), counts


def test_a_closed_event_loop_aborts_its_requests(make_llm):
    """A consumer's loop closed without finalizing its generator: the engine notices on the
    next delivery and aborts the request, instead of generating for nobody."""
    llm = make_llm()
    loop = asyncio.new_event_loop()
    stream = llm.generate([3, 4], SamplingParams(max_tokens=200, **GREEDY), "orphan")
    loop.run_until_complete(anext(stream))
    loop.close()

    async def main():
        assert await until(lambda: gone(llm, "orphan")), "the orphan request was never aborted"
        return await idle_state(llm)

    assert asyncio.run(main()) == (0.0, 0, 0, True)
    del stream


def test_a_huge_prompt_is_tokenized_without_stalling_other_streams():
    """A 4 MB text prompt took seconds of tokenizing on the engine thread, and no stream advanced
    meanwhile. `AsyncLLM.prepare` tokenizes on a worker thread (the tokenizer releases the GIL):
    another stream keeps getting tokens while it runs, and the prompt is then rejected as too long."""
    llm = AsyncLLM(engine=tiny_engine(tiny_loaded_model(), max_model_len=320))
    big = "w5 " * 1_400_000

    async def main():
        async for _ in llm.generate([5, 6], SamplingParams(max_tokens=2, temperature=0.0)):
            pass  # compile first: a compile would stall the stream whatever the tokenizer does
        tokenizing, started = threading.Event(), asyncio.Event()
        received = during = 0

        async def stream():
            nonlocal received, during
            params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
            async for _ in llm.generate([5, 6, 7], params):
                received += 1
                during += tokenizing.is_set()
                started.set()

        streaming = asyncio.ensure_future(stream())
        await started.wait()
        check_inputs = llm.engine.check_inputs

        def flagged_check_inputs(*args):  # on prepare's worker thread
            tokenizing.set()
            try:
                return check_inputs(*args)
            finally:
                tokenizing.clear()

        llm.engine.check_inputs = flagged_check_inputs
        with pytest.raises(ValueError, match="prompt is 1400001 tokens long|prompt is 1400000 tokens long"):
            await llm.prepare(big, SamplingParams(max_tokens=2))
        await streaming
        return during, received

    try:
        during, total = asyncio.run(main())
    finally:
        llm.shutdown()
    assert total == 300 and during >= 10, (during, total)


def _paused_llm(loaded, **options):
    return AsyncLLM(engine=tiny_engine(loaded), stream_buffer=8, **options)


def test_a_reader_that_stops_reading_pauses_its_request_and_gets_every_token_later(loaded):
    """A consumer that stops reading had its whole answer generated into an unbounded queue.
    Now the request stops being scheduled once 8 outputs wait untaken, while another stream
    goes on; read again, it resumes, and its tokens equal the same request run alone."""
    llm = _paused_llm(loaded, stream_stall_timeout_s=None)
    params = SamplingParams(max_tokens=200, **GREEDY)

    async def main():
        slow = llm.generate([5, 6, 7], params, "slow")
        first = [await anext(slow)]
        other = await collect(llm, [9, 10], params)  # 200 steps while "slow" waits
        state = llm.engine.states["slow"]
        generated = len(state.trackers[0].token_ids)
        queued = llm._streams["slow"].queue.qsize()
        rest = [out async for out in slow]
        return first + rest, other, generated, queued

    try:
        deltas, other, generated, queued = asyncio.run(main())
        kv_after = llm.kv_cache_usage
    finally:
        llm.shutdown()
    assert generated <= 8 + 3 and queued <= 8 + 2, (generated, queued)  # the buffer, plus steps in flight
    assert joined(other)[0] == alone(loaded, [([9, 10], params)])[0].token_ids
    tokens, _, reasons = joined(deltas)
    assert tokens == alone(loaded, [([5, 6, 7], params)])[0].token_ids and reasons[-1] == "length"
    assert kv_after == 0.0


def test_a_reader_that_never_reads_is_aborted_after_the_stall_timeout(loaded):
    """A reader that takes nothing after its first output: its request is paused once 8 outputs
    wait, and aborted, its KV freed, once it has been paused for the 0.5 s stall timeout (not
    before: both instants are read on the engine thread's monotonic clock)."""
    llm = _paused_llm(loaded, stream_stall_timeout_s=0.5)
    engine = llm.engine
    aborted_at = []
    abort = engine.abort_request

    def timed_abort(request_ids):
        if "stalled" in ([request_ids] if isinstance(request_ids, str) else request_ids):
            aborted_at.append(time.monotonic())
        return abort(request_ids)

    engine.abort_request = timed_abort

    async def main():
        stalled = llm.generate([5, 6, 7], SamplingParams(max_tokens=200, **GREEDY), "stalled")
        await anext(stalled)
        stream = llm._streams["stalled"]
        assert await until(lambda: gone(llm, "stalled")), "the stalled request was never aborted"
        # `gone` ran on the engine thread after the abort's step and its load snapshot.
        usage, running = llm.kv_cache_usage, llm.num_running
        rest = [out async for out in stalled]
        return stream.paused_since, usage, running, rest

    try:
        paused_at, usage, running, rest = asyncio.run(main())
    finally:
        llm.shutdown()
    assert paused_at is not None and aborted_at, (paused_at, aborted_at)
    assert aborted_at[0] - paused_at >= 0.5, "aborted before the stall timeout"
    assert (usage, running) == (0.0, 0)
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert len(joined(rest)[0]) <= 8 + 3


def test_the_load_never_counts_a_request_whose_last_output_was_read(make_llm):
    """GetLoad right after a stream's last chunk could still count it as running: the load was
    snapshotted after the outputs went out."""
    llm = make_llm()

    async def main():
        seen = []
        for i in range(30):
            async for out in llm.generate([5, 6 + i % 7], SamplingParams(max_tokens=1 + i % 4, **GREEDY)):
                if out.finished:
                    seen.append((llm.num_running, llm.num_waiting))
        return seen

    assert asyncio.run(main()) == [(0, 0)] * 30
