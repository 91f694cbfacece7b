"""road_export.runtime.generation's one decode loop (`Decoding`, `decode`) on a numeric stand-in for a decoder: a run
whose next token is the sum of every real token it has seen (through the past it is fed, or the whole sequence), mod V.
The reference is that sum computed directly; the loop must reach it through its cache (present -> past, mask and
position growth, left padding), without a cache, across a recompute, and stop rows at EOS with padding."""

from __future__ import annotations

import numpy as np
import pytest

from road_export.runtime.generation import Decoding, Sampling, decode, host_pick
from road_export.runtime.kvcache import CacheLayout, HostMemory, new_cache

V = 11
PAST, PRESENT = "past_key_values.0", "present.0"
LAYOUT = CacheLayout(((PAST, PRESENT),), {PAST: (1, 1)}, np.float32, positions=True)


class Model:
    """present = past ++ (the new tokens, 0 where masked); logits one-hot at (sum of present) mod V, per position
    (position t sums the past and the new tokens up to t). Counts runs and checks position_ids against the mask."""

    def __init__(self):
        self.runs = 0

    def __call__(self, feeds, shared):
        self.runs += 1
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        new = ids.shape[1]
        values = (ids * mask[:, -new:]).astype(np.float32)[:, None, :, None]
        past = feeds.get(PAST, np.zeros((ids.shape[0], 1, 0, 1), np.float32))
        present = np.concatenate([past, values], 2)
        if "position_ids" in feeds:  # each row counts its own real tokens (left padding: transformers' positions)
            expected = np.maximum(np.cumsum(mask, -1) - 1, 0)[:, -new:]
            np.testing.assert_array_equal(feeds["position_ids"][mask[:, -new:] == 1], expected[mask[:, -new:] == 1])
        totals = past[:, 0, :, 0].sum(-1, keepdims=True) + np.cumsum(values[:, 0, :, 0], -1)
        logits = np.eye(V, dtype=np.float32)[totals.astype(np.int64) % V]
        return {"logits": logits, PRESENT: present}


def reference(rows: list[list[int]], new: int, eos: int | None = None, pad: int = 0) -> np.ndarray:
    out = []
    for row in rows:
        seq, done, got = list(row), False, []
        for _ in range(new):
            token = pad if done else sum(seq) % V
            got.append(token)
            if not done:
                seq.append(token)
                done = token == eos
        out.append(got)
    return np.array(out)


def prompts():
    rows = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3]]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return rows, ids, mask


def tokens(decoding, ids, mask, new, eos=(), pad=0):
    pick = host_pick(decoding, Sampling(), np.random.default_rng(0))
    steps = list(decode(decoding, ids, mask, max_new_tokens=new, pick=pick, eos=np.array(eos, np.int64),
                        pad_token_id=pad))
    return np.stack([s.tokens for s in steps], 1)


def test_the_cache_and_the_whole_sequence_give_the_reference():
    rows, ids, mask = prompts()
    model = Model()
    cached = Decoding(model, new_cache(LAYOUT))
    np.testing.assert_array_equal(tokens(cached, ids, mask, 6), reference(rows, 6))
    assert model.runs == 6
    rerun = Decoding(Model(), None, positions=True)  # no cache: every run is the whole sequence
    np.testing.assert_array_equal(tokens(rerun, ids, mask, 6), reference(rows, 6))


def test_rows_stop_at_eos_and_are_padded():
    rows, ids, mask = prompts()
    want = reference(rows, 8, eos=7, pad=10)
    assert (want == 10).any()  # some row finishes early here
    np.testing.assert_array_equal(tokens(Decoding(Model(), new_cache(LAYOUT)), ids, mask, 8, eos=[7], pad=10), want)


def test_the_recompute_reruns_the_whole_sequence_once():
    """At `recompute_at` the cache is renewed and the whole sequence runs again: same tokens, one fresh prefill."""
    rows, ids, mask = prompts()
    renewed = []

    def renew(grown, remaining):
        renewed.append((grown.shape[1], remaining))
        return new_cache(LAYOUT)

    decoding = Decoding(Model(), new_cache(LAYOUT), recompute_at=ids.shape[1] + 3, renew=renew)
    np.testing.assert_array_equal(tokens(decoding, ids, mask, 6), reference(rows, 6))
    assert renewed == [(ids.shape[1] + 3, 3)]


def test_outputs_reach_the_cache_only_before_the_next_step():
    """The last run's outputs stay out of the cache (as the loops always did) until a step or a row move needs
    them; a planted fault — outputs never handed over — changes the tokens."""
    rows, ids, mask = prompts()
    decoding = Decoding(Model(), new_cache(LAYOUT))
    tokens(decoding, ids, mask, 3)
    assert decoding._pending is not None and decoding._cache.past[PAST].shape[2] == ids.shape[1] + 1
    assert decoding.cache.past[PAST].shape[2] == ids.shape[1] + 2  # read: handed over
    decoding.keep([2, 0])
    assert decoding.cache.rows == 2

    class Forgetful(Decoding):
        @property
        def cache(self):
            return self._cache

    assert not np.array_equal(tokens(Forgetful(Model(), new_cache(LAYOUT)), ids, mask, 4), reference(rows, 4))


def test_host_memory_pads_and_takes_as_its_docstring_says():
    a, b = np.arange(24, dtype=np.float32).reshape(2, 1, 3, 4) + 1, np.ones((1, 1, 5, 4), np.float32)
    memory = HostMemory()
    left, right = memory.join(a, b, 5, left=True), memory.join(a, b, 5, left=False)
    assert left.shape == right.shape == (3, 1, 5, 4)
    np.testing.assert_array_equal(left[:2, :, 2:], a)
    assert not left[:2, :, :2].any()
    np.testing.assert_array_equal(right[:2, :, :3], a)
    assert not right[:2, :, 3:].any()
    np.testing.assert_array_equal(left[2:], b)
    np.testing.assert_array_equal(memory.take(a, [1, 0], 1, 2), a[[1, 0], :, 1:2])
    grown = memory.grow(a, 7)
    assert grown.shape == (2, 1, 7, 4) and not grown[:, :, 3:].any()
    np.testing.assert_array_equal(grown[:, :, :3], a)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_memory_moves_rows_as_host_memory_does(dtype):
    """road_export.runtime.gpu.DeviceMemory, the IOBinding loop's cache memory (here on the CPU: the same onnxruntime
    sessions), takes, joins and grows rows as HostMemory does, giving OrtValues."""
    import onnxruntime as ort

    from road_export.runtime.gpu import DeviceMemory

    class CpuSession:
        device = "cpu"

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(shape).astype(dtype) for shape in ((3, 2, 5, 4), (2, 2, 7, 4)))
    host, device = HostMemory(), DeviceMemory(CpuSession())
    assert isinstance(device.zeros((1, 2, 3, 4), dtype), ort.OrtValue)

    def on(x):
        return ort.OrtValue.ortvalue_from_numpy(x)

    for rows, start, stop in [([2, 0], 1, None), ([1], 0, 3), ([0, 1, 2], 0, 5), ([2], 4, 5)]:
        got = device.take(on(a), rows, start, stop)
        assert isinstance(got, ort.OrtValue)
        np.testing.assert_array_equal(got.numpy(), host.take(a, rows, start, stop))
    for left in (True, False):
        for width in (7, 9):
            got = device.join(on(a), on(b), width, left=left)
            assert isinstance(got, ort.OrtValue) and device.shape(got) == (5, 2, width, 4)
            np.testing.assert_array_equal(got.numpy(), host.join(a, b, width, left=left))
    for width in (5, 8):
        got = device.grow(on(a), width)
        assert isinstance(got, ort.OrtValue) and device.shape(got) == (3, 2, width, 4)
        np.testing.assert_array_equal(got.numpy(), host.grow(a, width))


def test_a_shared_buffer_grows_to_its_limit_and_a_fixed_one_refuses(monkeypatch):
    """A GroupQueryAttention shared buffer of a fixed capacity refuses a row that would pass its end; given a
    `limit` it starts at the prompt's bucket, doubles (capped at the limit) keeping what it held, and refuses only
    past the limit."""
    from road_export.core.errors import RoadError
    from road_export.runtime import kvcache

    monkeypatch.setattr(kvcache, "SMALLEST_BUFFER", 2)
    layout = CacheLayout(((PAST, PRESENT),), {PAST: (1, 1)}, np.float32, gqa=True, share_buffer=True)
    ids, mask = np.array([[5, 6, 7]]), np.ones((1, 3), np.int64)
    fixed = new_cache(layout, capacity=4)
    fixed.prefill(ids, mask)
    fixed.step(np.array([1]))
    with pytest.raises(RoadError, match="needs 5 cache positions; the shared key/value buffer holds 4"):
        fixed.step(np.array([1]))
    growing = new_cache(layout, limit=6)
    feeds = growing.prefill(ids, mask)
    assert growing.capacity == 4 and feeds[PAST].shape == (1, 1, 4, 1)  # bucket(3 + 1)
    growing.past[PAST] = np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1) + 1  # as the run wrote it
    growing.step(np.array([1]))
    feeds = growing.step(np.array([1]))  # 5 positions: doubled to 8, capped at 6
    assert growing.capacity == 6
    np.testing.assert_array_equal(feeds[PAST][0, 0, :, 0], [1, 2, 3, 4, 0, 0])
    growing.step(np.array([1]))
    with pytest.raises(RoadError, match="needs 7 cache positions; the shared key/value buffer holds 6"):
        growing.step(np.array([1]))
