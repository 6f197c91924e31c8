"""The scheduler and block manager without a model: a fake runner stores each token's "keys"
((token, position) pairs) in the slots its block table names and computes the next token from
what it reads back through the table, so a wrong, stale or freed block changes the output.
Every row's output must equal the reference computed from its prompt alone, whatever the pool
size, block size, preemptions and prefix sharing."""

import os
import random
import subprocess
import sys

import pytest

from model.outputs import Detokenizer, OutputProcessor
from model.sampling_params import SamplingParams as Params
from model.scheduler import RESERVED_BLOCKS, BlockManager, Scheduler, Sequence, cdiv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def next_token(tokens) -> int:
    h = 17
    for i, t in enumerate(tokens):
        h = (h * 31 + t * (i + 7)) % 1_000_003
    return 3 + h % 50


def reference(prompt, max_new, stop_ids=(), max_seq_len=10**9):
    out = []
    while True:
        out.append(next_token(prompt + out))
        if out[-1] in stop_ids or len(out) >= max_new or len(prompt) + len(out) >= max_seq_len:
            return out


class FakeRunner:
    def __init__(self, block_size):
        self.bs = block_size
        self.slots: dict[int, tuple[int, int]] = {}
        self.forward_tokens = []

    def read_back(self, seq, n):
        """The first n tokens of seq as its block table finds them in the pool."""
        got = []
        for p in range(n):
            token, pos = self.slots[seq.blocks[p // self.bs] * self.bs + p % self.bs]
            assert pos == p, f"slot for position {p} holds position {pos}"
            got.append(token)
        return got

    def execute(self, step):
        for block in step.fresh_blocks:  # zeroed blocks: nothing readable
            for o in range(self.bs):
                self.slots.pop(block * self.bs + o, None)
        sampled, scored = [], []
        self.forward_tokens.append(sum(item.num_tokens for item in step.items))
        for item in step.items:
            seq = item.seq
            assert seq.row >= 0 and item.start == seq.num_computed
            assert len(seq.blocks) * self.bs >= item.start + item.num_tokens
            for j, t in enumerate(seq.tokens(item.start, item.start + item.num_tokens)):
                p = item.start + j
                self.slots[seq.blocks[p // self.bs] * self.bs + p % self.bs] = (t, p)
            end = item.start + item.num_tokens
            if item.sample:
                seen = self.read_back(seq, end)
                assert seen == seq.tokens(0, end)
                sampled.append(next_token(seen))
            if item.outputs_from is not None:
                scored.append((seq, item.outputs_from, end, self.read_back(seq, end)))
        return sampled, scored


def drive(sched, runner, outputs=None, max_steps=20000):
    """Step until done; with `outputs` (an OutputProcessor) its output step ends rows at stop strings."""
    finished = []
    for _ in range(max_steps):
        if not sched.has_work():
            return finished
        step = sched.schedule()
        assert step.items, "no progress"
        sampled, _ = runner.execute(step)
        finished += sched.update(step, sampled)
        if outputs is not None:
            hits = outputs.stop_strings([i.seq for i in step.items if i.sample])
            finished += [s for s in hits if sched.finish(s, "stop")]
    raise AssertionError("did not finish")


def make(num_blocks, bs, max_rows=64, budget=64, max_seq_len=4096, **kw):
    blocks = BlockManager(num_blocks + RESERVED_BLOCKS, bs, prefix_caching=kw.pop("prefix_caching", True))
    return Scheduler(blocks, max_rows=max_rows, max_seq_len=max_seq_len, prefill_token_budget=budget, **kw), \
        FakeRunner(bs)


def workload(n, seed, shared=0):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 60) for _ in range(shared)]
    rows = []
    for i in range(n):
        length = rng.randrange(1, 12) if rng.random() < 0.85 else rng.randrange(30, 60)  # heavy tail
        rows.append((prefix + [rng.randrange(3, 60) for _ in range(length)], rng.randrange(1, 20)))
    return rows


@pytest.mark.parametrize("num_blocks,bs,max_rows,budget,pressured", [
    (400, 4, 64, 64, False), (30, 4, 64, 64, True), (12, 8, 8, 16, True), (24, 1, 5, 7, False),
    (9, 16, 3, 100, False), (40, 2, 64, 3, True)])
@pytest.mark.parametrize("shared", [0, 9])
@pytest.mark.parametrize("reserve_growth", [False, True])
def test_outputs_equal_reference_under_memory_pressure(num_blocks, bs, max_rows, budget, pressured, shared,
                                                       reserve_growth):
    sched, runner = make(num_blocks, bs, max_rows=max_rows, budget=budget, reserve_growth=reserve_growth)
    rows = workload(40, seed=num_blocks + bs, shared=shared)
    seqs = [Sequence(i, p, Params(max_new_tokens=n)) for i, (p, n) in enumerate(rows)]
    admitted = [sched.add(s) for s in seqs]
    done = drive(sched, runner)
    assert sorted(s.index for s in done) == [s.index for s, ok in zip(seqs, admitted) if ok]
    for s, ok in zip(seqs, admitted):
        if ok:
            assert s.output == reference(s.prompt, s.params.max_new_tokens) and s.finish_reason == "length"
        else:  # only rows that cannot fit the empty pool are refused, with the numbers
            assert cdiv(len(s.prompt) + s.params.max_new_tokens, bs) > num_blocks
            assert s.finish_reason == "error" and s.error_kind == "kv_cache_too_small" and str(num_blocks * bs) in s.error
    st = sched.stats()
    assert st["rows_in_flight_peak"] <= max_rows
    assert st["kv_tokens_peak"] <= num_blocks * bs
    assert max(runner.forward_tokens) <= max(budget, 1) + max_rows + 60  # budget + decode rows (+ one whole prompt)
    # every block is back: free, or cached with no reference
    assert sched.blocks.num_free == sched.blocks.capacity
    assert all(r == 0 for r in sched.blocks.ref)
    if pressured and not reserve_growth:
        assert st["preemptions"] > 0  # the small pools really were under pressure


def test_admission_by_tokens_not_rows():
    """A pool of 10 blocks of 4 tokens admits rows while their prompt (+1 token) fits."""
    sched, runner = make(10, 4, max_rows=100, budget=1000, reserve_growth=False)
    for i in range(6):
        sched.add(Sequence(i, [i + 3] + [5] * 7, Params(max_new_tokens=1)))  # 8 tokens + 1 headroom = 3 blocks each
    step = sched.schedule()
    assert len(step.items) == 3  # 9 blocks used; the 4th row would need 3 more (watermark 1 kept)
    assert sched.blocks.num_free == 1 and len(sched.waiting) == 3


def test_most_recent_row_is_preempted_and_oldest_progresses():
    sched, runner = make(8, 2, max_rows=10, budget=100, reserve_growth=False)
    seqs = [Sequence(i, [3 + i, 4, 5], Params(max_new_tokens=12)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    order = []
    while sched.has_work():
        step = sched.schedule()
        order += [s.index for s in step.preempted]
        sampled, _ = runner.execute(step)
        sched.update(step, sampled)
    assert order and order[0] == 2  # the newest went first
    assert 0 not in order  # the oldest row was never preempted
    for s in seqs:
        assert s.output == reference(s.prompt, 12)


def test_rows_sharing_a_block_being_computed_wait_one_step_and_share_it():
    sched, runner = make(50, 4, budget=1000)
    prefix = list(range(10, 22))  # 3 full blocks
    seqs = [Sequence(i, prefix + [40 + i], Params(max_new_tokens=2)) for i in range(4)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert [i.seq.index for i in first.items] == [0]  # the others wait for row 0's blocks
    sampled, _ = runner.execute(first)
    sched.update(first, sampled)
    second = sched.schedule()
    starts = {i.seq.index: i.start for i in second.items if not i.decode}
    assert starts == {1: 12, 2: 12, 3: 12}  # 12 cached tokens reused by reference
    assert all(s.blocks[:3] == seqs[0].blocks[:3] for s in seqs)
    assert all(sched.blocks.ref[b] == 4 for b in seqs[0].blocks[:3])
    sampled, _ = runner.execute(second)
    sched.update(second, sampled)
    drive(sched, runner)
    for s in seqs:
        assert s.output == reference(s.prompt, 2)


def test_cached_blocks_survive_calls_and_are_evicted_lru_when_needed():
    sched, runner = make(12, 4, budget=1000)
    a = Sequence(0, list(range(3, 15)) + [50], Params(max_new_tokens=1))  # 3 full blocks + 1 token
    sched.add(a)
    drive(sched, runner)
    assert sched.blocks.num_free == sched.blocks.capacity and len(sched.blocks.evictable) >= 3
    again = Sequence(1, list(range(3, 15)) + [51], Params(max_new_tokens=1))
    sched.add(again)
    step = sched.schedule()
    assert step.items[0].start == 12  # found in the cache after the first row finished
    sampled, _ = runner.execute(step)
    sched.update(step, sampled)
    drive(sched, runner)
    # a row that needs the whole pool evicts the cached blocks
    big = Sequence(2, [7] * 40, Params(max_new_tokens=4))
    sched.add(big)
    drive(sched, runner)
    assert big.output == reference(big.prompt, 4)
    assert a.hashes[0] not in sched.blocks.cached


def test_chunked_prefill_respects_the_budget_and_samples_only_at_the_end():
    sched, runner = make(100, 4, budget=10)
    s = Sequence(0, list(range(3, 40)), Params(max_new_tokens=3))  # 37 tokens: chunks of 10, 10, 10, 7
    sched.add(s)
    chunks = []
    while sched.has_work():
        step = sched.schedule()
        chunks += [(i.num_tokens, i.sample) for i in step.items]
        sampled, _ = runner.execute(step)
        sched.update(step, sampled)
    assert chunks[:4] == [(10, False), (10, False), (10, False), (7, True)]
    assert s.output == reference(s.prompt, 3)


def test_without_chunking_a_whole_prompt_runs_alone_when_over_budget():
    sched, runner = make(100, 4, budget=10, chunked_prefill=False)
    sched.add(Sequence(0, list(range(3, 40)), Params(max_new_tokens=1)))
    sched.add(Sequence(1, [5, 6], Params(max_new_tokens=1)))
    step = sched.schedule()
    assert [(i.seq.index, i.num_tokens) for i in step.items] == [(0, 37)]


def test_scoring_rows_return_positions_and_sample_nothing():
    sched, runner = make(100, 4, budget=6)
    s = Sequence(0, list(range(3, 20)), score_from=12)  # positions 12..16 predict tokens 13..17
    sched.add(s)
    positions = []
    while sched.has_work():
        step = sched.schedule()
        _, scored = runner.execute(step)
        for seq, frm, end, seen in scored:
            positions += list(range(frm, end))
            assert seen == seq.tokens(0, end)
        assert sched.update(step, []) in ([], [s])
    assert positions == [12, 13, 14, 15, 16] and s.finish_reason == "length" and not s.output


def test_stop_ids_max_seq_len_and_stop_strings():
    sched, runner = make(100, 4)
    prompt = [9, 9, 9]
    free = reference(prompt, 12)
    stop = Sequence(0, prompt, Params(max_new_tokens=12), stop_ids=frozenset({free[4]}))
    capped = Sequence(1, prompt, Params(max_new_tokens=12))
    sched.add(stop)
    drive(sched, runner)
    assert stop.finish_reason == "stop" and stop.output == free[:free.index(free[4]) + 1]
    short, runner2 = make(100, 4, max_seq_len=8)
    short.add(capped)
    drive(short, runner2)
    assert capped.finish_reason == "length" and len(capped.prompt) + len(capped.output) == 8
    # stop strings: checked on the text the new tokens added, through the detokenizer
    words = {t: f"w{t} " for t in range(60)}
    decode = lambda ids: "".join(words[t] for t in ids)  # noqa: E731
    text_sched, runner3 = make(100, 4)
    outputs = OutputProcessor(decode)
    target = decode(free)[len(decode(free[:3])):][:4]  # token 3's text, found when token 3 arrives
    row = Sequence(2, prompt, Params(max_new_tokens=12, stop=[target]))
    text_sched.add(row)
    outputs.add(row)
    assert drive(text_sched, runner3, outputs) == [row]
    assert row.finish_reason == "stop" and outputs.completion(row).text == decode(free)[:decode(free).find(target)]


def test_a_stop_string_straddling_two_tokens_stops_the_row():
    """The stop string starts inside the previous token's text and ends inside the new one's:
    it is looked for from before where the new text begins, not only in the new text."""
    words = {t: f"w{t} " for t in range(60)}
    decode = lambda ids: "".join(words[t] for t in ids)  # noqa: E731
    prompt = [9, 9, 9]
    free = reference(prompt, 12)
    assert free[3:5] == [31, 15]  # hand-checked: tokens 3 and 4 read "w31 w15 "
    text = decode(free)
    cut = len(decode(free[:3])) + 2
    target = text[cut:cut + 4]
    assert target == "1 w1" and text.find(target) == cut  # first seen half in token 3, half in token 4
    sched, runner = make(100, 4)
    outputs = OutputProcessor(decode)
    row = Sequence(0, prompt, Params(max_new_tokens=12, stop=[target]))
    sched.add(row)
    outputs.add(row)
    drive(sched, runner, outputs)
    assert row.finish_reason == "stop" and row.output == free[:5]
    assert outputs.completion(row).text == "w6 w5 w10 w3"


def test_scheduler_and_sampling_params_import_without_torch():
    """The scheduler, SamplingParams, the memory arithmetic and the tokenizer need no torch."""
    code = ("import sys; import model.scheduler, model.sampling_params, model.capacity, model.tokenizer; "
            "from model import SamplingParams, PersimmonConfig; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_detokenizer_equals_full_decode_and_waits_inside_a_character():
    pieces = {0: b"\xe2", 1: b"\x82", 2: b"\xac", 3: b"a", 4: b" b"}
    decode = lambda ids: b"".join(pieces[t] for t in ids).decode("utf-8", errors="replace")  # noqa: E731
    d = Detokenizer(decode)
    tokens, deltas = [], []
    for t in [3, 0, 1, 2, 4, 3, 0, 1, 2]:
        tokens.append(t)
        deltas.append(d.add(tokens))
    assert d.text == decode(tokens) == "a€ ba€"
    assert deltas == ["a", "", "", "€", " b", "a", "", "", "€"]


def test_block_manager_refcounts_and_reserved_blocks():
    m = BlockManager(6, 4)
    got = m.allocate(4)
    assert sorted(got) == [2, 3, 4, 5] and m.allocate(1) is None  # blocks 0 (null) and 1 (scratch) never
    m.register(got[0], b"h0")
    m.release(got)
    assert m.num_free == 4 and b"h0" in m.cached
    hit = m.lookup([b"h0", b"h1"])
    assert hit == [got[0]] and m.ref[got[0]] == 1 and m.num_free == 3
    m.release(hit)
    again = m.allocate(4)  # needs every block: the cached one is evicted
    assert again is not None and b"h0" not in m.cached


def test_admission_holds_back_the_growth_finished_rows_predict():
    """Rows that used all their max_new_tokens teach the scheduler to keep that much room for the
    running rows' growth: a second wave is admitted without preemptions."""
    sched, runner = make(40, 4, max_rows=64, budget=1000)
    first = [Sequence(i, [3 + i, 4, 5, 6], Params(max_new_tokens=12)) for i in range(8)]  # 4 + 12 = 16 tokens each
    for s in first:
        sched.add(s)
    drive(sched, runner)
    assert sched.growth_ratio > 0.9  # every row generated all 12 tokens
    preempted = sched.preemptions
    wave = [Sequence(100 + i, [30 + i, 4, 5, 6], Params(max_new_tokens=12)) for i in range(12)]
    for s in wave:
        sched.add(s)
    step = sched.schedule()
    # 40 blocks hold 10 rows of 16 tokens (4 blocks each): not all 12 prompts (2 blocks each now)
    assert len(step.items) <= 10
    drive(sched, runner)  # (the first step's items were already scheduled: finish them through update)
    assert sched.preemptions == preempted
    for s in wave:
        assert s.output == reference(s.prompt, 12)
    # rows that stop early teach it to hold back less
    quick = [Sequence(200 + i, [60 + i, 4], Params(max_new_tokens=50), stop_ids=frozenset(range(3, 60))) for i in range(60)]
    for s in quick:
        sched.add(s)
    drive(sched, runner)
    assert sched.growth_ratio < 0.3
