"""Hostile input at the HTTP boundary: a malformed or extreme request is a 4xx in OpenAI's error shape whose
message names the field at fault, never a 500; an internal error answers a 500 that leaks nothing; training
never publishes broken weights; a failed register leaves no trace; metric names that metrics.jsonl keeps
for itself are refused. Afterwards the server still answers /health and a normal chat.

The real server runs on 127.0.0.1 behind an API key, with the tiny random Llama (conftest.py) as the base
model and one trainable model on it, so the module runs in well under a minute on two CPU cores. Bodies are
sent as Python's `json.dumps` writes them: NaN and Infinity as bare words (which the server reads), and a
lone surrogate as the escape "\\ud800".
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import torch

import advantage.service as service_module
from advantage.backends.local import LocalBackend
from advantage.config import AdamParams
from advantage.engine.sampling import SamplingParams
from advantage.engine.torch_engine import QueueFull
from advantage.server import guard
from advantage.server.runner import BackgroundServer, free_port
from advantage.server.schemas import INTERNAL_ERROR
from advantage.service import Service

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

KEY = "hostile-key"
NAME = "h"
HI = [{"role": "user", "content": "Say hi."}]
CHAT = "/v1/chat/completions"
OPS = f"/v1/training/models/{NAME}"
NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """As `advantage serve --model-dir DIR` builds it: base models load from under DIR only."""
    svc = Service(
        tmp_path_factory.mktemp("hostile"),
        engine_kwargs={"max_context": 256},
        model_dirs=[tiny_model_dir.parent],
    )
    svc.register("proj", NAME, str(tiny_model_dir))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def root(service: Service) -> Iterator[str]:
    srv = BackgroundServer(service, api_key=KEY).start()
    yield f"http://{srv.host}:{srv.port}"
    srv.stop()


@pytest.fixture(scope="module")
def choice(root: str) -> dict[str, Any]:
    """A real Choice from the trainable model, as a client would put it into a trajectory."""
    r = post(root, CHAT, {"model": NAME, "messages": HI, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    return dict(r.json()["choices"][0])


def post(root: str, path: str, body: Any = None, *, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(root + path, content=content, headers=headers, timeout=120)


def get(root: str, path: str) -> httpx.Response:
    return httpx.get(root + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def assert_error(
    r: httpx.Response, status: int, words: list[str], param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape, the status, and a message that names the problem (every word, any case)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    for word in words:
        assert word.lower() in err["message"].lower(), (word, err["message"])
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def json_schema(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": NAME, "messages": HI, "max_tokens": 2, **fields}


def tool(parameters: Any, description: str = "A tool.") -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": "f", "description": description, "parameters": parameters},
    }


def call(arguments: str) -> dict[str, Any]:
    fn = {"name": "f", "arguments": arguments}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": fn}],
    }


# ------------------------------------------------------------------------------- A: chat completions


# One case a line: (id, body or raw bytes, status, words the message must hold, param).
# fmt: off
CHAT_CASES: list[tuple[str, dict[str, Any] | bytes, int, list[str], str | None]] = [
    ("schema-300-deep", chat(response_format=json_schema(deep_schema(300))), 400, ["response_format", "nested"], "response_format"),
    ("tool-schema-300-deep", chat(tools=[tool(deep_schema(300))], tool_choice="required"), 400, ["tools", "nested"], "tools"),
    ("schema-bad-type", chat(response_format=json_schema({"type": "bogus"})), 400, ["response_format", "bogus"], "response_format"),
    ("schema-dangling-ref", chat(response_format=json_schema({"$ref": "#/nope"})), 400, ["response_format", "/nope"], "response_format"),
    ("schema-huge-min-length", chat(response_format=json_schema({"type": "string", "minLength": 10**12})), 400, ["response_format"], "response_format"),
    ("schema-not-object", chat(response_format={"type": "json_schema", "json_schema": {"schema": 5}}), 400, ["response_format"], "response_format"),
    ("response-format-type", chat(response_format={"type": 5}), 400, ["response_format.type"], "response_format"),
    ("tool-parameters-not-object", chat(tools=[tool("x")], tool_choice="required"), 400, ["tools"], "tools"),
    ("format-and-forced-tool", chat(response_format={"type": "json_object"}, tools=[tool({"type": "object"})], tool_choice="required"), 400, ["either response_format or a forced tool_choice"], None),
    ("surrogate-content", chat(messages=[{"role": "user", "content": "\ud800"}]), 400, ["messages[0]", "surrogate"], "messages"),
    ("surrogate-text-part", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a\udfffb"}]}]), 400, ["messages[0]", "surrogate"], "messages"),
    ("surrogate-system", chat(messages=[{"role": "system", "content": "\udc00"}, *HI]), 400, ["messages[0]", "surrogate"], "messages"),
    ("surrogate-tool-arguments", chat(messages=[*HI, call('{"a": "\ud800"}')]), 400, ["messages[1]", "surrogate"], "messages"),
    ("surrogate-tool-description", chat(tools=[tool({"type": "object"}, "\ud800")]), 400, ["tools[0]", "surrogate"], "tools"),
    ("surrogate-key", chat(messages=[{"role": "user", "content": "hi", "\udc00": 1}]), 400, ["messages[0]", "surrogate"], "messages"),
    ("model-superscript-step", chat(model=f"{NAME}@²"), 404, ["integer step"], "model"),
    ("model-5000-digit-step", chat(model=f"{NAME}@" + "9" * 5000), 404, ["integer step"], "model"),
    ("model-negative-step", chat(model=f"{NAME}@-1"), 404, ["integer step"], "model"),
    ("model-fraction-step", chat(model=f"{NAME}@1.5"), 404, ["integer step"], "model"),
    ("model-missing-step", chat(model=f"{NAME}@7"), 404, ["step 7", "not available"], "model"),
    ("model-surrogate", chat(model="\ud800"), 404, ["does not exist"], "model"),
    ("model-superscript-unknown", chat(model="m@²"), 404, ["does not exist"], "model"),
    ("max-tokens-1e20", chat(max_tokens=10**20), 400, ["max_tokens"], "messages"),
    ("n-1e30", chat(n=10**30), 400, ["n must be"], None),
    ("temperature-nan", chat(temperature=NAN), 400, ["temperature"], None),
    ("top-p-infinity", chat(top_p=INF), 400, ["top_p"], None),
    ("tool-arguments-list", chat(messages=[*HI, call("[]")]), 400, ["arguments", "object"], "messages"),
    ("body-5000-deep", b'{"model": "h", "messages": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", 400, ["body", "JSON object"], None),
    ("body-not-json", b'{"model": "h", "messages": [', 400, ["JSON"], None),
]
# fmt: on


@pytest.mark.parametrize(
    ("body", "status", "words", "param"), [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES]
)
def test_chat_bad_input_is_a_4xx(
    root: str, body: Any, status: int, words: list[str], param: str | None
) -> None:
    r = post(root, CHAT, raw=body) if isinstance(body, bytes) else post(root, CHAT, body)
    assert_error(r, status, words, param)


# ------------------------------------------------------------------------------------ A: training routes


def group(choice: dict[str, Any], rewards: tuple[float, ...] = (0.0, 1.0), **changes: Any) -> dict[str, Any]:
    ch = {**choice, **changes}
    items = [{"message": HI[0]}, {"choice": ch}]
    return {"trajectories": [{"messages_and_choices": items, "reward": r} for r in rewards]}


def datum(**changes: Any) -> dict[str, Any]:
    return {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], **changes}


def train_cases(choice: dict[str, Any]) -> list[tuple[str, str, Any, list[str], str | None]]:
    """(id, op, body, words, param); every one is a 400."""
    ok = [group(choice)]
    n = len(choice["token_ids"])
    # fmt: off
    return [
        ("train-rewards-1e308", "train", {"groups": [group(choice, (1e308, -1e308))]}, ["reward", "1e+12"], "groups.0"),
        ("log-rewards-1e308", "log", {"groups": [group(choice, (1e308, -1e308))]}, ["reward", "1e+12"], "groups.0"),
        ("train-reward-1e13", "train", {"groups": [group(choice, (0.0, 1e13))]}, ["trajectory 1", "reward"], "groups.0"),
        ("train-reward-nan", "train", {"groups": [group(choice, (0.0, NAN))]}, ["reward nan", "finite"], "groups.0"),
        ("log-reward-infinity", "log", {"groups": [group(choice, (INF, 0.0))]}, ["reward inf"], "groups.0"),
        ("train-token-ids-1e9", "train", {"groups": [group(choice, token_ids=[10**9] * n)]}, ["token_ids", "vocabulary"], "groups.0"),
        ("train-token-ids-negative", "train", {"groups": [group(choice, token_ids=[-5] * n)]}, ["token_ids", "-5", "vocabulary"], "groups.0"),
        ("train-token-ids-1e30", "train", {"groups": [group(choice, token_ids=[10**30] * n)]}, ["token_ids", "vocabulary"], "groups.0"),
        ("train-token-ids-strings", "train", {"groups": [group(choice, token_ids=["a"] * n)]}, ["token_ids", "integer"], "groups.0"),
        ("train-token-ids-bools", "train", {"groups": [group(choice, token_ids=[True] * n)]}, ["token_ids", "integer"], "groups.0"),
        ("train-token-ids-not-list", "train", {"groups": [group(choice, token_ids=7)]}, ["token_ids"], "groups.0"),
        ("train-token-logprobs-nan", "train", {"groups": [group(choice, token_logprobs=[NAN] * n)]}, ["token_logprobs", "finite"], "groups.0"),
        ("train-token-logprobs-inf", "train", {"groups": [group(choice, token_logprobs=[-INF] * n)]}, ["token_logprobs", "finite"], "groups.0"),
        ("train-token-logprobs-short", "train", {"groups": [group(choice, token_logprobs=[-1.0])]}, ["token_logprobs", "one logprob per id"], "groups.0"),
        ("train-forced-out-of-range", "train", {"groups": [group(choice, forced_token_indices=[n])]}, ["forced_token_indices", "indices into token_ids"], "groups.0"),
        ("train-forced-not-list", "train", {"groups": [group(choice, forced_token_indices="all")]}, ["forced_token_indices"], "groups.0"),
        ("train-no-groups", "train", {"groups": []}, ["no trajectory groups"], "groups"),
        ("train-empty-group", "train", {"groups": [{"trajectories": []}]}, ["group 0", "no trajectories"], "groups.0.trajectories"),
        ("train-item-not-message", "train", {"groups": [{"trajectories": [{"messages_and_choices": [{"x": 1}], "reward": 0}]}]}, ["does not read"], "groups.0"),
        ("train-bad-choice", "train", {"groups": [{"trajectories": [{"messages_and_choices": [{"choice": {"x": 1}}], "reward": 0}]}]}, ["does not read"], "groups.0"),
        ("train-metric-nan", "train", {"groups": [{"trajectories": [{"messages_and_choices": [], "reward": 0, "metrics": {"m": NAN}}]}]}, ["metrics", "finite"], None),
        ("train-lr-1e30", "train", {"groups": ok, "config": {"learning_rate": 1e30}}, ["learning_rate"], "config.learning_rate"),
        ("train-lr-infinity", "train", {"groups": ok, "config": {"learning_rate": INF}}, ["learning_rate"], "config.learning_rate"),
        ("train-lr-zero", "train", {"groups": ok, "config": {"learning_rate": 0}}, ["learning_rate"], "config.learning_rate"),
        ("train-beta2-one", "train", {"groups": ok, "config": {"betas": [0.9, 1.0]}}, ["betas"], "config.betas.1"),
        ("train-beta1-negative", "train", {"groups": ok, "config": {"betas": [-0.1, 0.9]}}, ["betas"], "config.betas.0"),
        ("train-weight-decay-1e9", "train", {"groups": ok, "config": {"weight_decay": 1e9}}, ["weight_decay"], "config.weight_decay"),
        ("train-micro-batch-1e6", "train", {"groups": ok, "config": {"micro_batch_size": 10**6}}, ["micro_batch_size"], "config.micro_batch_size"),
        ("train-max-seq-len-1e9", "train", {"groups": ok, "config": {"max_seq_len": 10**9}}, ["max_seq_len"], "config.max_seq_len"),
        ("train-kl-beta-1e9", "train", {"groups": ok, "config": {"kl_beta": 1e9}}, ["kl_beta"], "config.kl_beta"),
        ("train-eps-5", "train", {"groups": ok, "config": {"eps": 5}}, ["eps"], "config.eps"),
        ("train-eps-high-1e9", "train", {"groups": ok, "config": {"eps_high": 1e9}}, ["eps_high"], "config.eps_high"),
        ("train-cispo-max-1e9", "train", {"groups": ok, "config": {"cispo_eps_max": 1e9}}, ["cispo_eps_max"], "config.cispo_eps_max"),
        ("train-unknown-config-key", "train", {"groups": ok, "config": {"lr": 1e-4}}, ["config.lr"], "config.lr"),
        ("forward-loss-mask-infinity", "forward", {"datums": [datum(input_ids=[1, 2], loss_mask=[0, INF])]}, ["loss_mask", "0 or 1"], None),
        ("forward-loss-mask-nan", "forward", {"datums": [datum(input_ids=[1, 2], loss_mask=[0, NAN])]}, ["loss_mask", "0 or 1"], None),
        ("forward-loss-mask-two", "forward", {"datums": [datum(loss_mask=[0, 1, 2])]}, ["loss_mask", "0 or 1"], None),
        ("forward-ids-1e30", "forward", {"datums": [datum(input_ids=[1, 10**30, 2])]}, ["vocabulary"], None),
        ("forward-ids-negative", "forward", {"datums": [datum(input_ids=[-1, 2, 3])]}, ["vocabulary"], None),
        ("forward-logprobs-infinity", "forward", {"datums": [datum(logprobs=[0, 1e400, 0])]}, ["logprobs", "non-finite"], None),
        ("forward-micro-batch-zero", "forward", {"datums": [datum()], "micro_batch_size": 0}, ["micro_batch_size"], "micro_batch_size"),
        ("fb-kl-beta-1e9", "forward_backward", {"datums": [datum()], "loss_config": {"kl_beta": 1e9}}, ["kl_beta"], "loss_config.kl_beta"),
        ("fb-advantage-nan", "forward_backward", {"datums": [datum(advantage=NAN)]}, ["advantage"], None),
        ("optim-lr-1e30", "optim_step", {"adam": {"lr": 1e30}}, ["lr"], "adam.lr"),
        ("optim-beta1-one", "optim_step", {"adam": {"betas": [1.0, 0.99]}}, ["betas"], "adam.betas.0"),
        ("optim-weight-decay-1e9", "optim_step", {"adam": {"weight_decay": 1e9}}, ["weight_decay"], "adam.weight_decay"),
        ("datums-rewards-1e308", "datums", {"groups": [group(choice, (1e308, -1e308))]}, ["group 0", "reward", "1e+12"], None),
        ("datums-not-a-group", "datums", {"groups": [{"trajectories": "x"}]}, ["group 0", "does not read"], None),
        ("sample-surrogate", "sample", {"prompt": [{"role": "user", "content": "\ud800"}]}, ["surrogate"], None),
        ("sample-step-1e9", "sample", {"prompt": [1, 2], "step": 10**9}, ["step 1000000000", "not available"], None),
        ("sample-ids-1e30", "sample", {"prompt": [1, 10**30]}, ["vocabulary"], None),
        ("sample-max-tokens-1e12", "sample", {"prompt": [1], "max_tokens": 10**12}, ["max_tokens"], None),
        ("sft-surrogate", "sft_datums", {"trajectories": [{"messages_and_choices": [{"message": {"role": "user", "content": "\ud800"}}, {"message": {"role": "assistant", "content": "x"}}]}]}, ["surrogate"], None),
        ("save-metric-step", "save_weights", {"metrics": {"step": 5}}, ["reserved", "step"], "metrics"),
        ("save-metric-split-time", "save_weights", {"metrics": {"split": 1, "time": 2}}, ["reserved", "split", "time"], "metrics"),
        ("save-split-escape", "save_weights", {"split": "../x"}, ["split"], None),
        ("log-split-escape", "log", {"groups": [group(choice)], "split": "../x"}, ["split"], None),
        ("log-split-empty", "log", {"groups": [group(choice)], "split": ""}, ["split"], None),
        ("delete-metric-split", "delete_checkpoints", {"metric": "split"}, ["split", "numeric metrics"], None),
        ("delete-metric-step", "delete_checkpoints", {"metric": "step"}, ["step", "numeric metrics"], None),
        ("delete-keep-bad", "delete_checkpoints", {"keep": "best"}, ["keep"], "keep"),
        ("promote-step-1e9", "promote", {"step": 10**9, "accept": True}, ["step 1000000000", "not served"], None),
        ("promote-metric-step", "promote", {"step": 1, "accept": False, "metrics": {"step": 1}}, ["reserved"], "metrics"),
        ("mark-outcome-bad", "mark_trained", {"keys": [["c", 0]], "step": 1, "outcome": "eaten"}, ["outcome"], "outcome"),
        ("traffic-limit-zero", "online_traffic", {"limit": 0}, ["limit"], "limit"),
        ("traffic-kind-bad", "online_traffic", {"kind": "gold"}, ["kind"], "kind"),
        ("traffic-golden-reward-str", "online_traffic", {"kind": "golden", "min_reward": "high"}, ["min_reward"], "min_reward"),
    ]
    # fmt: on


_CASE_IDS = [c[0] for c in train_cases({"token_ids": [1], "token_logprobs": [0.0]})]


@pytest.mark.parametrize("case", _CASE_IDS)
def test_training_bad_input_is_a_400(root: str, choice: dict[str, Any], case: str) -> None:
    [(_, op, body, words, param)] = [c for c in train_cases(choice) if c[0] == case]
    step = get(root, f"{OPS}/step").json()["step"]
    assert_error(post(root, f"{OPS}/{op}", body), 400, words, param)
    assert get(root, f"{OPS}/step").json()["step"] == step  # nothing was trained or saved


REGISTER_CASES = [
    ("lora-rank-1e6", {"lora": {"r": 10**6}}, ["lora.r"]),
    ("lora-alpha-1e30", {"lora": {"alpha": 1e30}}, ["lora.alpha"]),
    ("lora-dropout-one", {"lora": {"dropout": 1.0}}, ["lora.dropout"]),
    ("lora-no-such-module", {"lora": {"target_modules": ["nope"]}}, ["target modules"]),
    ("name-escapes", {"name": "../x"}, ["model name"]),
    ("project-escapes", {"project": "a/b"}, ["project"]),
    ("no-such-base", {"base_model": "/nonexistent-advantage-model"}, ["unknown base model"]),
    ("base-etc", {"base_model": "/etc"}, ["unknown base model"]),
    ("base-escapes-model-dir", {"base_model": "../../../etc"}, ["unknown base model"]),
]


@pytest.mark.parametrize(
    ("changes", "words"), [c[1:] for c in REGISTER_CASES], ids=[c[0] for c in REGISTER_CASES]
)
def test_register_bad_input_is_a_400(
    root: str, tiny_model_dir: Path, changes: dict[str, Any], words: list[str]
) -> None:
    body = {"project": "proj", "name": "newcomer", "base_model": str(tiny_model_dir), **changes}
    assert_error(post(root, "/v1/training/models", body), 400, words)
    assert "newcomer" not in [m["id"] for m in get(root, "/v1/models").json()["data"]]


def test_train_error_found_while_training_is_a_400_event(root: str, choice: dict[str, Any]) -> None:
    """Tokenizing happens on the training thread: a surrogate in a trajectory arrives as a 400 error event."""
    g = group(choice)
    for t in g["trajectories"]:
        t["messages_and_choices"][0] = {"message": {"role": "user", "content": "\ud800"}}
    r = post(root, f"{OPS}/train", {"groups": [g]})
    assert r.status_code == 200
    last = json.loads(r.text.splitlines()[-1])
    assert last["event"] == "error" and last["status"] == 400, last
    assert "surrogate" in last["error"]["message"]


# ------------------------------------------------------------------------------ A: internal errors leak nothing


def test_internal_errors_answer_a_generic_500(
    root: str, service: Service, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "secret-detail /srv/internal/path"

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(secret)

    async def aboom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(secret)

    monkeypatch.setattr(service, "log_groups", boom)
    monkeypatch.setattr(service, "train_async", aboom)
    monkeypatch.setattr(service, "resolve", boom)
    with caplog.at_level(logging.ERROR):
        for r in (
            post(
                root,
                f"{OPS}/log",
                {"groups": [{"trajectories": [{"messages_and_choices": [], "reward": 0}]}]},
            ),
            post(root, CHAT, chat()),
        ):
            err = assert_error(r, 500, [])
            assert err["message"] == INTERNAL_ERROR and err["type"] == "server_error"
            assert "secret" not in r.text and "RuntimeError" not in r.text
        r = post(
            root, f"{OPS}/train", {"groups": [{"trajectories": [{"messages_and_choices": [], "reward": 0}]}]}
        )
        event = json.loads(r.text.splitlines()[-1])
        assert event["status"] == 500 and event["error"]["message"] == INTERNAL_ERROR
        assert "secret" not in r.text
    assert secret in caplog.text  # the traceback is in the server's log


# ---------------------------------------------------------------------- B: training never publishes broken weights


def _weights(service: Service) -> list[torch.Tensor]:
    _, trainer = service.trainable(NAME)
    return [p.detach().clone() for p in trainer.params]


def _state(s: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).clone() for k, v in s.items()}


def _chat_works(root: str, model: str = NAME) -> None:
    r = post(root, CHAT, {"model": model, "messages": HI, "max_tokens": 4, "temperature": 1.0, "seed": 1})
    assert r.status_code == 200, r.text
    lps = r.json()["choices"][0]["token_logprobs"]
    assert lps and all(math.isfinite(x) for x in lps)


def test_lr_1e30_is_refused_and_nothing_is_published(
    root: str, service: Service, choice: dict[str, Any]
) -> None:
    before = _weights(service)
    step = get(root, f"{OPS}/step").json()["step"]
    r = post(root, f"{OPS}/train", {"groups": [group(choice)], "config": {"learning_rate": 1e30}})
    assert_error(r, 400, ["learning_rate", "less than or equal to 1"], "config.learning_rate")
    assert get(root, f"{OPS}/step").json()["step"] == step
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(service), strict=True))
    _chat_works(root)


def test_an_infinite_gradient_is_not_applied(root: str, service: Service) -> None:
    before = _weights(service)
    huge = datum(extras={"logprob_grad": [0.0, 3e38, 3e38]})  # the "linear" loss sums w * logp: -inf
    r = post(root, f"{OPS}/forward_backward", {"datums": [huge], "loss": "linear"})
    assert r.status_code == 200, r.text
    r = post(root, f"{OPS}/optim_step", {})
    assert r.status_code == 200 and not math.isfinite(json.loads(r.text)["metrics"]["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(service), strict=True))
    _chat_works(root)


@pytest.mark.parametrize("fault", ["nan-weights", "overflow-raises"])
def test_a_step_that_breaks_the_weights_is_undone(
    root: str, service: Service, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The bounds keep such steps out of every route; the trainer still refuses to keep one."""
    _, trainer = service.trainable(NAME)
    r = post(
        root, f"{OPS}/forward_backward", {"datums": [datum(advantage=1.0)], "loss": "importance_sampling"}
    )
    assert r.status_code == 200, r.text
    before = _weights(service)
    state_before = [_state(trainer.optimizer.state.get(p, {})) for p in trainer.params]
    lr = 1e-3
    if fault == "nan-weights":  # a step whose arithmetic goes NaN
        real_step = trainer.optimizer.step

        def poisoned_step() -> None:
            real_step()
            trainer.params[-1].data.fill_(NAN)

        monkeypatch.setattr(trainer.optimizer, "step", poisoned_step)
        expected: Any = pytest.raises(ValueError, match="non-finite, so it was undone")
    else:  # torch refuses lr * update past float32 midway, after updating some of the state
        lr = 1e39
        expected = pytest.raises(RuntimeError, match="overflow")
    with expected:
        asyncio.run(service.on_train_thread(trainer.optim_step, AdamParams(), lr))
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(service), strict=True))
    state_after = [_state(trainer.optimizer.state.get(p, {})) for p in trainer.params]
    assert [s.keys() for s in state_after] == [s.keys() for s in state_before]
    for a, b in zip(state_before, state_after, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.grad is None for p in trainer.params)  # the step's gradients are gone either way
    r = post(root, f"{OPS}/save_weights", {})
    assert r.status_code == 200, r.text
    _chat_works(root, r.json()["name"])


# ------------------------------------------------------------------------ C: a failed register leaves no trace


def test_failed_register_leaves_no_trace(root: str, tiny_model_dir: Path) -> None:
    body = {
        "project": "p2",
        "name": "ghost",
        "base_model": str(tiny_model_dir),
        "lora": {"target_modules": ["nope"]},
    }
    assert_error(post(root, "/v1/training/models", body), 400, ["target modules"])
    assert not any(m["id"].startswith("ghost") for m in get(root, "/v1/models").json()["data"])
    assert_error(post(root, CHAT, chat(model="ghost")), 404, ["does not exist"])
    # The name is free: another project may take it (before, the half-registered entry held it).
    r = post(root, "/v1/training/models", {**body, "project": "p3", "lora": {}})
    assert r.status_code == 200 and r.json()["step"] == 0, r.text
    assert "ghost" in [m["id"] for m in get(root, "/v1/models").json()["data"]]
    _chat_works(root, "ghost")


def test_failed_register_closes_the_engine_it_started(
    service: Service, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "same-model-other-name"
    other.symlink_to(tiny_model_dir)

    def disk_full(*args: Any, **kwargs: Any) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(service_module.ckpt, "write_step", disk_full)
    with pytest.raises(OSError, match="disk full"):
        service.register("p4", "unlucky", str(other))
    names = service.served_names()
    assert str(other) not in names and "unlucky" not in names


def test_concurrent_registers_of_one_name_are_serialized(
    service: Service, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[float] = []
    real = service.trainer_factory

    def slow_trainer(*args: Any, **kwargs: Any) -> Any:
        built.append(time.monotonic())
        time.sleep(0.5)  # wide enough for the second register to arrive mid-way
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "trainer_factory", slow_trainer)
    results: list[int | BaseException] = []

    def register() -> None:
        try:
            results.append(service.register("p5", "twin", str(tiny_model_dir)))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=register) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [0, 0] and len(built) == 1  # the second waited, then found the first's model


# ------------------------------------------------------------------ D: metrics.jsonl keeps its own columns


def test_reserved_metric_names_are_refused(root: str, service: Service) -> None:
    step = get(root, f"{OPS}/step").json()["step"]
    err = assert_error(
        post(root, f"{OPS}/save_weights", {"metrics": {"step": 99, "ok": 1}}), 400, ["reserved"]
    )
    assert "step, split, time" in err["message"]
    assert get(root, f"{OPS}/step").json()["step"] == step  # refused before anything was saved
    with pytest.raises(ValueError, match="reserved"):
        service.model_entry(NAME).log.append(step, "train", {"time": 1.0})


def test_delete_checkpoints_names_the_numeric_metrics(root: str) -> None:
    r = post(root, f"{OPS}/save_weights", {"metrics": {"val/reward": 0.5}, "split": "val"})
    assert r.status_code == 200, r.text
    err = assert_error(post(root, f"{OPS}/delete_checkpoints", {"metric": "split"}), 400, ["val/reward"])
    assert "could not convert" not in err["message"]


async def test_local_backend_log_validates_split(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, progress=False)
    try:
        with pytest.raises(ValueError, match="Invalid split '../x'"):
            await backend.log(types.SimpleNamespace(name=NAME), [], "../x")  # type: ignore[arg-type]
    finally:
        await backend.close()
    assert not (tmp_path.parent / "x").exists()


# ------------------------------------------------------------- E: the body limit counts the bytes actually read


def padded(body: dict[str, Any], total: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    """A valid JSON body padded with whitespace to `total` bytes, sent chunked (httpx sends a generator with
    Transfer-Encoding: chunked and no Content-Length)."""
    head = json.dumps(body).encode()
    yield head
    left = total - len(head)
    while left > 0:
        yield b" " * min(chunk, left)
        left -= chunk


BODY_LIMIT_ROUTES = [
    ("POST", CHAT, chat(max_tokens=1)),
    ("POST", f"{OPS}/forward", {"datums": [datum()]}),
    ("POST", "/v1/training/models", {"project": "p", "name": "x", "base_model": "nope"}),
    ("GET", "/v1/models", {}),
    ("POST", "/v1/no-such-route", {}),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), BODY_LIMIT_ROUTES, ids=[f"{m} {p}" for m, p, _ in BODY_LIMIT_ROUTES]
)
def test_a_chunked_body_over_the_limit_is_a_413(
    root: str, monkeypatch: pytest.MonkeyPatch, method: str, path: str, body: dict[str, Any]
) -> None:
    """Before, only Content-Length was checked: a chunked 9 MB chat was read whole and answered 200."""
    monkeypatch.setattr(guard, "MAX_TRAIN_BODY_BYTES", 2 * 2**20)  # 256 MiB would take a while to send
    limit = guard.body_limit(path)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.request(method, root + path, content=padded(body, limit + 2**20), headers=headers, timeout=120)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    assert_error(r, 413, [f"over {limit} bytes"])


def test_a_chunked_body_under_the_limit_is_served(root: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    total = guard.MAX_BODY_BYTES - 1024
    r = httpx.post(root + CHAT, content=padded(chat(max_tokens=1), total), headers=headers, timeout=120)
    assert r.status_code == 200, r.text


def test_a_declared_length_over_the_limit_is_a_413_before_the_body(root: str) -> None:
    r = post(root, CHAT, raw=b" " * (guard.MAX_BODY_BYTES + 1))
    assert_error(r, 413, [f"over {guard.MAX_BODY_BYTES} bytes"])


# ------------------------------------------------------------------ F: nothing CPU-heavy on the event loop


def test_health_stays_fast_during_a_60000_message_chat_and_a_train_step(
    root: str, choice: dict[str, Any]
) -> None:
    """Rendering and tokenizing 60,000 messages took ~3 s on the event loop, and /health waited that long.
    The bound is lenient (a shared two-core box); the p99 is printed."""
    huge = json.dumps(
        {"model": NAME, "messages": [{"role": "user", "content": "hi"}] * 60_000, "max_tokens": 1}
    ).encode()
    answers: dict[str, httpx.Response] = {}
    spans: list[tuple[float, float]] = []

    def heavy(what: str, path: str, body: Any) -> None:
        t0 = time.perf_counter()
        answers[what] = post(root, path, raw=body) if isinstance(body, bytes) else post(root, path, body)
        spans.append((t0, time.perf_counter()))

    threads = [
        threading.Thread(target=heavy, args=("chat", CHAT, huge)),
        threading.Thread(target=heavy, args=("train", f"{OPS}/train", {"groups": [group(choice)]})),
    ]
    latencies: list[float] = []
    with httpx.Client(timeout=30) as client:
        client.get(f"{root}/health")  # connected before the load starts
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            assert client.get(f"{root}/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    for t in threads:
        t.join()
    # The chat was read, rendered and tokenized (60,000 turns do not fit the context: a 400 says so).
    assert_error(answers["chat"], 400, ["context"], "messages")
    assert answers["train"].status_code == 200
    assert json.loads(answers["train"].text.splitlines()[-1])["event"] == "result"
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    busy = max(b for _, b in spans) - min(a for a, _ in spans)
    print(
        f"/health under load: n={len(latencies)} p50={latencies[len(latencies) // 2] * 1e3:.1f} ms "
        f"p99={p99 * 1e3:.1f} ms max={latencies[-1] * 1e3:.1f} ms over {busy:.1f} s of load"
    )
    assert len(latencies) >= 10
    assert p99 < 1.0


# ----------------------------------------------------------------------------------- G: bounded queues


def _base_engine(service: Service) -> Any:
    return service.engine(service.model_entry(NAME).base_model)


def test_a_full_engine_queue_is_a_429_with_retry_after(
    root: str, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _base_engine(service)
    monkeypatch.setattr(engine, "max_pending", 2)
    gate, holding = threading.Event(), threading.Event()
    # The engine thread waits on the gate, so every request submitted meanwhile stays pending.
    holder = threading.Thread(target=engine._run_on_engine, args=(lambda: (holding.set(), gate.wait(60)),))
    holder.start()
    answers: list[httpx.Response] = []
    waiting = [
        threading.Thread(target=lambda: answers.append(post(root, CHAT, chat(max_tokens=2))))
        for _ in range(2)
    ]
    try:
        assert holding.wait(30)
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 30
        while len(engine._pending) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        for path, body in ((CHAT, chat()), (CHAT, chat(stream=True)), (f"{OPS}/sample", {"prompt": [1, 2]})):
            r = post(root, path, body)
            err = assert_error(r, 429, ["busy", "2 requests are waiting", "retry in 1 s"])
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
    finally:
        gate.set()
        holder.join(30)
        for t in waiting:
            t.join(60)
    assert [a.status_code for a in answers] == [200, 200]  # the waiting ones were served


def test_a_full_training_queue_is_a_429_with_retry_after(
    root: str, service: Service, choice: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.training, "max_queue", 1)
    gate, started = threading.Event(), threading.Event()
    running = service.submit_train(lambda: (started.set(), gate.wait(60)))
    assert started.wait(30)
    queued = service.submit_train(lambda: None)  # the one job allowed to wait
    step = get(root, f"{OPS}/step").json()["step"]
    try:
        for op, body in (("train", {"groups": [group(choice)]}), ("forward", {"datums": [datum()]})):
            r = post(root, f"{OPS}/{op}", body)
            err = assert_error(r, 429, ["training queue is full", "retry in 5 s"])
            assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "5"
        with pytest.raises(QueueFull):
            service.submit_train(lambda: None)
    finally:
        gate.set()
    running.result(30)
    queued.result(30)
    assert get(root, f"{OPS}/step").json()["step"] == step  # the refused step never ran
    assert post(root, f"{OPS}/forward", {"datums": [datum()]}).status_code == 200


def _slow_decoding(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine._decode_step

    def slow() -> None:
        time.sleep(0.05)
        real()

    monkeypatch.setattr(engine, "_decode_step", slow)


def _until(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(cond())


def test_a_cancelled_request_leaves_the_batch_at_the_next_decode_step(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _base_engine(service)
    _slow_decoding(engine, monkeypatch)
    fut = engine.submit([1, 2, 3], SamplingParams(max_tokens=200, temperature=0.0))
    assert _until(lambda: engine.stats["decode_steps"] > 0 and engine._batch.rows)
    cancelled = engine.stats["cancelled_rows"]
    at = engine.stats["decode_steps"]
    assert fut.cancel()
    assert _until(lambda: not engine._batch.rows)
    assert engine.stats["decode_steps"] - at <= 1  # the step under way when it was cancelled, no more
    assert engine.stats["cancelled_rows"] == cancelled + 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_goes_away_leaves_the_batch(
    root: str, service: Service, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """Before, generation went on to max_tokens for nobody."""
    engine = _base_engine(service)
    _slow_decoding(engine, monkeypatch)  # 200 tokens would take 10 s
    cancelled, steps = engine.stats["cancelled_rows"], engine.stats["decode_steps"]
    body = chat(max_tokens=200, temperature=0.0, stream=stream)
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as client:
        if stream:
            with client.stream("POST", root + CHAT, json=body, headers=headers) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(lines).startswith("data:") and next(x for x in lines if x)  # tokens flow
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(root + CHAT, json=body, headers=headers)
    # The connection is closed: the server cancels the request and its row leaves the batch.
    assert _until(lambda: engine.stats["cancelled_rows"] == cancelled + 1)
    assert _until(lambda: not engine._batch.rows)
    assert engine.stats["decode_steps"] - steps < 100  # far from the 200 asked for


# ----------------------------------------------------------------------------------- H: information leaks


def test_unknown_base_models_all_get_one_message(root: str, tiny_model_dir: Path) -> None:
    """Before, '/etc' and '/nonexistent' answered differently, which mapped the server's filesystem."""
    model_dir = tiny_model_dir.parent  # the service's --model-dir
    names = [
        "/etc",
        "/nonexistent",
        "/etc/passwd",
        "../../../etc",
        str(model_dir),  # the model dir itself is no model
        str(model_dir / "nonexistent"),
        str(tiny_model_dir / "config.json"),
        "\ud800",
    ]
    messages = set()
    for name in names:
        body = {"project": "proj", "name": "probe", "base_model": name}
        err = assert_error(post(root, "/v1/training/models", body), 400, ["unknown base model"])
        messages.add(err["message"].replace(repr(name).encode("utf-8", "backslashreplace").decode(), "X"))
    assert len(messages) == 1, messages
    assert "--model-dir" in messages.pop()


def test_a_model_under_the_model_dir_registers_by_its_relative_path(
    root: str, service: Service, tiny_model_dir: Path
) -> None:
    engines = len(service._engines)
    body = {"project": "proj", "name": "relative", "base_model": tiny_model_dir.name}
    r = post(root, "/v1/training/models", body)
    assert r.status_code == 200 and r.json()["step"] == 0, r.text
    assert service.model_entry("relative").base_model == str(tiny_model_dir)
    assert len(service._engines) == engines  # the same model, the same engine
    _chat_works(root, "relative")


def test_advantage_serve_keeps_the_key_out_of_its_log_and_loads_from_model_dirs_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The real command in a subprocess: uvicorn's access log prints query strings."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny").symlink_to(tiny_model_dir)  # an operator's symlink inside the model dir counts
    key, port = "s3cret+KEY/value", free_port()
    out = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "advantage", "serve", "--port", str(port), "--api-key", key,
           "--base-model", str(models / "tiny"), "--model-dir", str(models), "--root", str(tmp_path / "root"),
           "--max-pending", "8", "--max-train-queue", "2"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    with out.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            assert _until(lambda: _healthy(base), timeout=240), out.read_text()
            q = quote(key, safe="")
            r = httpx.get(f"{base}/v1/models?api_key={q}&key={q}&x=1", headers=headers, timeout=30)
            assert r.status_code == 200
            assert httpx.get(f"{base}/v1/models?token={q}", timeout=30).status_code == 401

            def register(base_model: str, name: str = "m") -> httpx.Response:
                body = {"project": "p", "name": name, "base_model": base_model}
                return httpx.post(f"{base}/v1/training/models", json=body, headers=headers, timeout=120)

            refused = {}
            for name in ("/etc", "/nonexistent", str(tiny_model_dir)):  # the last is a model, but outside
                err = assert_error(register(name), 400, ["unknown base model"])
                refused[name] = err["message"].replace(repr(name), "X")
            assert len(set(refused.values())) == 1, refused
            r = register("tiny")
            assert r.status_code == 200, r.text
            chat_body = {"model": "m", "messages": HI, "max_tokens": 2}
            r = httpx.post(f"{base}{CHAT}", json=chat_body, headers=headers, timeout=120)
            assert r.status_code == 200, r.text
        finally:
            proc.terminate()
            proc.wait(60)
    text = out.read_text()
    assert "GET /v1/models?api_key=***&key=***&x=1" in text, text
    assert "token=***" in text
    for secret in (key, quote(key, safe=""), quote(key)):
        assert secret not in text


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


# ----------------------------------------------------------------------------------------------- afterwards


def test_server_still_serves(root: str) -> None:
    assert httpx.get(f"{root}/health", timeout=30).json() == {"status": "ok"}
    _chat_works(root)
    r = post(root, CHAT, {"model": NAME, "messages": HI, "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
