"""Serving throughput: concurrent vs sequential requests through the real server, vs offline HF generation.

One process, one model, three measurements on the same prompts (greedy, same max_tokens):

  (a) concurrent  N chat requests at once through the HTTP server (BackgroundServer + AsyncOpenAI); the
                  engine batches them continuously.
  (b) sequential  the same N requests one after another through the same server.
  (c) offline     HF `model.generate` on the same N prompt token ids in one left-padded batch, with the model
                  loaded separately by transformers in the engine's dtype (bf16), same stop tokens.

tok/s = generated tokens / wall time, where generated tokens are the tokens actually produced (the server's
usage.completion_tokens; for generate, the tokens up to and including the first stop token). The prompts ask
for long answers so that most rows run to --max-tokens. Targets: concurrent/sequential >= 5x,
concurrent/offline >= 0.9x.

    .venv/bin/python benchmarks/serve_throughput.py [--model smollm2-135m-instruct] [--requests 16]
        [--max-tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see advantage.environment

import openai  # noqa: E402
import torch  # noqa: E402

TOPICS = [
    "the history of Rome", "how volcanoes form", "the life of honey bees", "the invention of the printing press",
    "how airplanes fly", "the water cycle", "the French Revolution", "how computers store data",
    "the Great Wall of China", "photosynthesis", "the history of chess", "how vaccines work",
    "the Amazon rainforest", "the first moon landing", "how bread is made", "the Industrial Revolution",
]
KEY = "bench-key"


@dataclass
class Phase:
    name: str
    seconds: float
    tokens: int
    requests: int
    decode_steps: int | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def messages_for(i: int) -> list[dict[str, str]]:
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"Write a long, detailed essay about {topic}. Use several paragraphs."}]


async def ask(client: openai.AsyncOpenAI, model: str, i: int, max_tokens: int):
    return await client.chat.completions.create(
        model=model, messages=messages_for(i), max_tokens=max_tokens, temperature=0
    )


async def run_server_phases(base_url: str, model: str, n: int, max_tokens: int, engine) -> tuple[Phase, Phase, dict]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=3600) as client:
        # Warm-up: one request, then a full batch (first-call allocations, per-shape kernels, HTTP connections).
        await ask(client, model, 0, 8)
        await asyncio.gather(*(ask(client, model, i, 8) for i in range(n)))

        steps0 = engine.stats["decode_steps"]
        t0 = time.perf_counter()
        conc = await asyncio.gather(*(ask(client, model, i, max_tokens) for i in range(n)))
        t_conc = time.perf_counter() - t0
        steps_conc = engine.stats["decode_steps"] - steps0

        steps0 = engine.stats["decode_steps"]
        t0 = time.perf_counter()
        seq = [await ask(client, model, i, max_tokens) for i in range(n)]
        t_seq = time.perf_counter() - t0
        steps_seq = engine.stats["decode_steps"] - steps0

    a = Phase("concurrent (server)", t_conc, sum(r.usage.completion_tokens for r in conc), n, steps_conc)
    b = Phase("sequential (server)", t_seq, sum(r.usage.completion_tokens for r in seq), n, steps_seq)
    ids_conc = [r.choices[0].model_extra["token_ids"] for r in conc]
    ids_seq = [r.choices[0].model_extra["token_ids"] for r in seq]
    prompts = [r.choices[0].model_extra["prompt_token_ids"] for r in conc]
    return a, b, {"conc_ids": ids_conc, "seq_ids": ids_seq, "prompts": prompts}


def run_offline(model_dir, prompts: list[list[int]], max_tokens: int, stop_ids: set[int], pad_id: int, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    kw = {
        "attention_mask": attn, "max_new_tokens": max_tokens, "do_sample": False, "temperature": None,
        "top_p": None, "top_k": None, "eos_token_id": sorted(stop_ids), "pad_token_id": pad_id,
    }
    with torch.inference_mode():
        model.generate(input_ids, **{**kw, "max_new_tokens": 8})  # warm-up, same batch
        t0 = time.perf_counter()
        out = model.generate(input_ids, **kw)
        seconds = time.perf_counter() - t0
    rows: list[list[int]] = []
    for row in out[:, width:].tolist():
        end = next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:end])
    return Phase("offline HF generate (1 batch)", seconds, sum(len(r) for r in rows), len(prompts)), rows


def same_count(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="bundled model name or HF model dir")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # before the engine thread runs its first op

    from advantage.engine.models import resolve_model_path
    from advantage.server.runner import BackgroundServer
    from advantage.service import Service

    model_dir = resolve_model_path(args.model)
    service = Service(tempfile.mkdtemp(prefix="advantage-bench-"), engine_kwargs={"dtype": args.dtype})
    engine = service.engine(args.model)
    server = BackgroundServer(service, api_key=KEY).start()
    print(f"model {args.model} ({model_dir}), device {engine.device}, dtype {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{args.requests} requests, greedy, max_tokens {args.max_tokens}, engine max_batch_size "
          f"{engine.max_batch_size}")
    try:
        conc, seq, ids = asyncio.run(
            run_server_phases(server.base_url, args.model, args.requests, args.max_tokens, engine)
        )
    finally:
        server.stop()
        stop_ids, pad_id = set(engine.stop_token_ids), engine.tokenizer.pad_token_id or 0
        service.close()
    offline, off_ids = run_offline(model_dir, ids["prompts"], args.max_tokens, stop_ids, pad_id, args.dtype)

    print()
    print(f"{'phase':<32}{'requests':>9}{'tokens':>8}{'seconds':>10}{'tok/s':>9}{'decode steps':>14}")
    for p in (conc, seq, offline):
        steps = "" if p.decode_steps is None else str(p.decode_steps)
        print(f"{p.name:<32}{p.requests:>9}{p.tokens:>8}{p.seconds:>10.2f}{p.tok_s:>9.1f}{steps:>14}")
    print()
    r1, r2 = conc.tok_s / seq.tok_s, conc.tok_s / offline.tok_s
    print(f"concurrent / sequential: {r1:.2f}x  (target >= 5x)  {'OK' if r1 >= 5 else 'BELOW TARGET'}")
    print(f"concurrent / offline:    {r2:.2f}x  (target >= 0.9x)  {'OK' if r2 >= 0.9 else 'BELOW TARGET'}")
    n = args.requests
    print(f"identical greedy ids: concurrent vs sequential {same_count(ids['conc_ids'], ids['seq_ids'])}/{n}, "
          f"concurrent vs offline {same_count(ids['conc_ids'], off_ids)}/{n}")


if __name__ == "__main__":
    main()
