"""The engine's KV storage: the in-place growing cache and the prompt-prefix cache give the same tokens and
logprobs as computing everything from scratch (fp32, so the comparison is exact up to float error)."""

from __future__ import annotations

import time

import pytest
import torch

from advantage.engine.kv import GrowingCache, PrefixCache, common_prefix_len
from advantage.engine.sampling import SamplingParams
from advantage.engine.torch_engine import TorchEngine


@pytest.mark.parametrize("impl", ["cpu-flash", "two-part"])
def test_cascade_attention_equals_attention_over_the_whole_context(impl: str):
    """Rows that read one shared copy of a prefix get exactly the attention over [prefix ; own columns]:
    grouped-query heads, several query tokens, a padded column, a causal edge in the rows' part, and a query
    that sees none of its row's own columns (only the prefix). On CPU the parts run in the flash kernel and
    merge by their log-sum-exps; `two_part_attention` (any device) shares one softmax."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from advantage.engine.cascade import cascade_attention, two_part_attention

    torch.manual_seed(0)
    B, H, KVH, T, P, S, d = 3, 6, 2, 2, 5, 4, 8
    module = types.SimpleNamespace(layer_idx=1, num_key_value_groups=H // KVH, is_causal=True)
    q = torch.randn(B, H, T, d).transpose(1, 2).contiguous().transpose(1, 2)  # strided as a model's are
    kp, vp = torch.randn(KVH, P, d), torch.randn(KVH, P, d)
    k, v = torch.randn(B, KVH, S, d), torch.randn(B, KVH, S, d)
    mask = torch.ones(B, 1, T, P + S, dtype=torch.bool)
    mask[0, :, :, P] = False  # row 0's first own column is padding
    mask[:, :, 0, -1] = False  # the first query token does not see the last column yet
    mask[2, :, 0, P:] = False  # row 2's first query token sees the prefix only
    whole_k = torch.cat([kp.expand(B, -1, -1, -1), k], dim=2)
    whole_v = torch.cat([vp.expand(B, -1, -1, -1), v], dim=2)
    want, _ = sdpa_attention_forward(module, q, whole_k, whole_v, mask, scaling=0.3)
    if impl == "two-part":
        got = two_part_attention(q, k, v, mask, kp, vp, 0.3)
    else:
        other = (torch.zeros_like(kp), torch.zeros_like(vp))  # layer 0's prefix: must not be read for layer 1
        got, _ = cascade_attention(module, q, k, v, mask, scaling=0.3, shared_prefix=[other, (kp, vp)])
    assert got.shape == (B, T, H, d)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    plain, _ = cascade_attention(module, q, whole_k, whole_v, mask, scaling=0.3)  # no prefix: plain SDPA
    torch.testing.assert_close(plain, want)


def test_cascade_attention_in_bf16_is_as_close_to_exact_as_sdpa():
    """In bf16 the flash parts round each part's output once before the fp32 merge: their error against
    fp64 attention stays at SDPA's own over the whole context (what the trainer computes)."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from advantage.engine.cascade import cascade_attention

    torch.manual_seed(1)
    B, H, KVH, T, P, S, d = 4, 9, 3, 3, 300, 40, 64
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=H // KVH, is_causal=True)
    q = 3 * torch.randn(B, H, T, d)  # sharp enough that a few columns dominate
    kp, vp = torch.randn(KVH, P, d), torch.randn(KVH, P, d)
    k, v = torch.randn(B, KVH, S, d), torch.randn(B, KVH, S, d)
    mask = torch.ones(B, 1, T, P + S, dtype=torch.bool)
    mask[:2, :, :, P : P + 7] = False  # left padding
    whole_k = torch.cat([kp.expand(B, -1, -1, -1), k], dim=2)
    whole_v = torch.cat([vp.expand(B, -1, -1, -1), v], dim=2)
    exact, _ = sdpa_attention_forward(
        module, q.double(), whole_k.double(), whole_v.double(), mask, scaling=0.125
    )
    bf = torch.bfloat16
    sdpa, _ = sdpa_attention_forward(module, q.to(bf), whole_k.to(bf), whole_v.to(bf), mask, scaling=0.125)
    got, _ = cascade_attention(
        module, q.to(bf), k.to(bf), v.to(bf), mask, scaling=0.125, shared_prefix=[(kp.to(bf), vp.to(bf))]
    )
    err_sdpa = (sdpa.double() - exact).abs().mean()
    err = (got.double() - exact).abs().mean()
    assert err < 1.5 * err_sdpa, (float(err), float(err_sdpa))


def _kv(n: int, value: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((2, n, 4), value), torch.full((2, n, 4), value)) for _ in range(3)]


def test_common_prefix_len():
    t = lambda xs: torch.tensor(xs)  # noqa: E731
    assert common_prefix_len(t([1, 2, 3]), t([1, 2, 4])) == 2
    assert common_prefix_len(t([1, 2]), t([1, 2, 3])) == 2
    assert common_prefix_len(t([5]), t([1])) == 0


def test_prefix_cache_lookup_insert_and_eviction():
    cache = PrefixCache(max_bytes=10**9, min_reuse=4)
    a = list(range(100))
    cache.insert("lora", a, _kv(100))
    assert cache.lookup(None, [a + [7]]) is None  # another adapter's states never match
    kv, m = cache.lookup("lora", [a[:50] + [1000] * 10, a[:60] + [2000]])
    assert m == 50 and kv[0][0].shape == (1, 2, 50, 4)
    _, m = cache.lookup("lora", [a])  # a whole cached prompt still leaves one token to prefill
    assert m == 99
    assert cache.lookup("lora", [[1000, 1, 2, 3, 4, 5]]) is None  # shorter than min_reuse in common
    cache.insert("lora", a + [1, 2, 3], _kv(103))  # extends the first entry, which is dropped
    assert len(cache) == 1
    cache.clear("lora")
    assert len(cache) == 0 and cache.nbytes == 0

    small = PrefixCache(max_bytes=2 * sum(k.numel() * 8 for k, _ in _kv(100)), min_reuse=4)
    for first in range(3):
        small.insert(None, [1000 + first] + a, _kv(101))
    assert len(small) == 1 and small.stats["evictions"] == 2  # least recently used go first
    few = PrefixCache(max_bytes=10**9, min_reuse=4, max_entries=2)
    for first in range(3):
        few.insert(None, [1000 + first] + a, _kv(101))
    assert len(few) == 2 and few.lookup(None, [[1000] + a]) is None  # the oldest went


def test_growing_cache_matches_concatenation():
    cache = GrowingCache(2)
    chunks = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 70, 1)]
    for c in chunks:
        k, v = cache.layers[1].update(c, -c)
    want = torch.cat(chunks, dim=-2)
    assert torch.equal(k, want) and torch.equal(v, -want)
    cache.layers[1].batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(cache.layers[1].keys, want[[2, 0]])
    assert cache.get_seq_length(1) == want.shape[-2]


@pytest.fixture(scope="module")
def engines(smollm_dir):
    cached = TorchEngine(smollm_dir, dtype="float32", max_batch_size=8, cascade=True)  # (CPU only by default)
    plain = TorchEngine(smollm_dir, dtype="float32", max_batch_size=8, prefix_cache_mb=0, cascade=False)
    yield cached, plain
    cached.close()
    plain.close()


def test_prefix_reuse_gives_the_same_completions(engines, tokenizer):
    cached, plain = engines
    system = [{"role": "system", "content": "You are a terse assistant. " * 12}]
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                system + [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        for q in ("Name a color.", "Name a fruit.", "Count to three.")
    ]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    first = cached.submit(prompts[0], params).result()
    # The first prompt is cached now; the others share its system prompt and prefill only their question.
    futures = [cached.submit(p, params) for p in prompts[1:]]
    reused = [f.result()[0] for f in futures]
    hits = cached.prefix_cache.stats["hit_tokens"]
    assert hits >= 2 * len(tokenizer(system[0]["content"])["input_ids"])
    for p, got in zip(prompts, [first[0], *reused], strict=True):
        want = plain.submit(p, params).result()[0]
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    # A follow-up turn extends a cached prompt, so it prefills only its new tokens.
    follow = prompts[1] + reused[0].token_ids + tokenizer.encode("\nAnd another one?")
    before = cached.prefix_cache.stats["miss_tokens"]
    got = cached.submit(follow, params).result()[0]
    assert cached.prefix_cache.stats["miss_tokens"] - before < 20
    want = plain.submit(follow, params).result()[0]
    assert got.token_ids == want.token_ids
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_rows_sharing_a_prefix_decode_as_rows_holding_their_own_copy(engines, tokenizer):
    """Cascade attention in the engine: rows that join the batch while it runs, with prompts sharing the
    system prompt, a longer cached prefix, or nothing, get the tokens and logprobs of an engine where every
    row holds its whole prompt (no cascade, no prefix cache)."""
    cached, plain = engines
    assert cached.cascade and not plain.cascade
    system = [{"role": "system", "content": "Answer in one short sentence, then stop. " * 10}]

    def chat(q: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            system + [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer.encode(text, add_special_tokens=False)

    prompts = [chat(q) for q in ("Name a river.", "Name a mountain.", "Name a sea.")]
    prompts.append(prompts[0] + tokenizer.encode(" A river", add_special_tokens=False))  # extends a prompt
    prompts.append(tokenizer.encode("Unrelated: one two three", add_special_tokens=False))  # shares nothing
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, n=k)
        for n, k in ((24, 2), (8, 1), (16, 3), (6, 1), (10, 2))
    ]
    steps = cached.stats["shared_prefix_steps"]
    # Alone in the batch, one prompt's rows hold nothing but the shared prefix; one finishes at once.
    pair = [cached.submit(prompts[1], SamplingParams(max_tokens=n, temperature=0.0)) for n in (1, 4)]
    for f, n in zip(pair, (1, 4), strict=True):
        want = plain.submit(prompts[1], SamplingParams(max_tokens=n, temperature=0.0)).result()[0]
        assert f.result()[0].token_ids == want.token_ids
    futures = []
    for p, sp in zip(prompts, params, strict=True):  # each joins the running batch a moment later
        futures.append(cached.submit(p, sp))
        time.sleep(0.3)
    got = [f.result() for f in futures]
    assert cached.stats["shared_prefix_steps"] > steps
    for p, sp, choices in zip(prompts, params, got, strict=True):
        want = plain.submit(p, sp).result()
        for g, w in zip(choices, want, strict=True):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)


def test_allowed_tokens_unpacks_llguidance_bitmasks(tokenizer):
    import llguidance.torch as llt

    from advantage.engine.grammar import GrammarCompiler, allowed_tokens, grammar_from_response_format

    vocab = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab)
    grammar = grammar_from_response_format({"type": "json_object"})
    # Rows in different states (so different masks), computed together in llguidance's thread pool.
    constraints = [compiler.matcher(grammar) for _ in range(3)]
    for n, c in enumerate(constraints):
        for tok in tokenizer.encode('{"a": "b', add_special_tokens=False)[:n]:
            c.consume(tok)
    mask = allowed_tokens([None, *constraints], vocab)
    assert mask[0].all()
    for row, c in enumerate(constraints, start=1):
        # The reference: llguidance's own masking of logits, one row at a time.
        bitmask = llt.allocate_token_bitmask(1, vocab)
        llt.fill_next_token_bitmask(c.matcher, bitmask, 0)
        logits = torch.zeros(1, vocab)
        llt.apply_token_bitmask_inplace(logits, bitmask)
        assert torch.equal(mask[row], logits[0] == 0)
        assert 0 < int(mask[row].sum()) < vocab
    assert not torch.equal(mask[1], mask[2])
    assert torch.equal(allowed_tokens([constraints[1]], vocab)[0], mask[2])  # one row: on this thread


def test_rows_that_finish_early_ride_along_without_changing_the_others(engines, tokenizer):
    """Rows of different lengths in one batch (some under a grammar): each finished row stays in the batch
    until a quarter of it has finished, and every request still gets exactly what it gets alone."""
    from advantage.engine.grammar import grammar_from_response_format

    _, plain = engines
    grammar = grammar_from_response_format({"type": "json_object"})
    prompt = tokenizer.encode("Here is a short story about a robot:", add_special_tokens=False)
    requests = [SamplingParams(max_tokens=n, temperature=0.0) for n in (2, 3, 5, 8, 13, 21)]
    requests.append(SamplingParams(max_tokens=6, temperature=0.0, grammar=grammar))
    requests.append(SamplingParams(max_tokens=30, temperature=0.0, grammar=grammar))
    alone = [plain.submit(prompt, p).result()[0] for p in requests]
    together = [f.result()[0] for f in [plain.submit(prompt, p) for p in requests]]
    for a, b in zip(alone, together, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
