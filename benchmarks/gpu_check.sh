#!/usr/bin/env bash
# The GPU check of issue 15, in one command from the repository root:
#   bash benchmarks/gpu_check.sh                       on the GPU box, with the wheels carried in .whl/
#   DEVICE=cpu SMALL=1 WHL=DIR bash benchmarks/gpu_check.sh   the same steps on a CPU (a rehearsal)
# 1. install the carried wheels (.whl/*.whl: what the box lacks, or has in another version) into /tmp/site;
# 2. make a random model with SmolLM2-135M-Instruct's config and tokenizer (.whl/smollm2-135m/), where the
#    bundled model would be (ADVANTAGE_CACHE_DIR), so that tests asking for the bundled name get it;
# 3. the engine contract suite, the gpu-marked CUDA engines included;
# 4. benchmarks/gpu_check.py bench (generation, a GRPO step, sampler-trainer agreement; bf16 and fp32);
# 5. a selection of fast tests (gpu-marked ones included), on CUDA since that is the default device where there is one
#    (in fp32: tests/conftest.py sets ADVANTAGE_DTYPE=float32; steps 3 and 4 cover bf16): first the
#    trainer / engine / training-loop ones, then the server ones (on a random model: a test that checks
#    what the model says fails there, and says nothing about CUDA).
# Everything lands in $OUT (at most 8 files): install.log contract.log bench.log bench.json tests.log
# server_tests.log summary.txt. Each step has a time limit; all of them fit in BUDGET_S (default 330 s,
# install included; a step that would start past it gets 10 s).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
WHL=${WHL:-.whl}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-330}
mkdir -p "$OUT"
start=$SECONDS
left() { local l=$((BUDGET_S - (SECONDS - start))); echo $((l > 10 ? l : 10)); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }
note() { echo "[gpu_check $((SECONDS - start))s] $*" | tee -a "$OUT/summary.txt"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
if [ -z "${NO_INSTALL:-}" ] && ls "$WHL"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHL"/*.whl >"$OUT/install.log" 2>&1 || { note "wheel install failed"; tail -20 "$OUT/install.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
note "installed; $($PY -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"

export ADVANTAGE_CACHE_DIR=${ADVANTAGE_CACHE_DIR:-/tmp/advantage-cache}
MODEL=$ADVANTAGE_CACHE_DIR/models/smollm2-135m-instruct
export ADVANTAGE_TEST_MODEL_DIR=$MODEL
if [ ! -f "$MODEL/model.safetensors" ]; then
  $PY benchmarks/gpu_check.py make-model --config-dir "$WHL/smollm2-135m" --out "$MODEL" ${SMALL:+--small} \
    >>"$OUT/install.log" 2>&1 || { note "make-model failed"; tail -20 "$OUT/install.log"; exit 1; }
fi
note "random SmolLM2-shaped model in $MODEL"

# Pytest with only the plugins we name: the box's own (cov, xdist, benchmark, ...) stay out of the way.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
PYTEST=($PY -m pytest -p pytest_asyncio.plugin -p no:cacheprovider -v --tb=short -rfE --durations=8)
# A per-test limit where the box's pytest-timeout loads with this pytest (checked on one small file).
if "${PYTEST[@]}" -p pytest_timeout --timeout=60 --co tests/test_schedules.py >/dev/null 2>&1; then
  PYTEST+=(-p pytest_timeout --timeout=120)
fi
note "pytest: $("${PYTEST[@]}" --version 2>&1 | head -1) | ${PYTEST[*]:3}"

if [ -z "${SKIP_CONTRACT:-}" ]; then
  timeout "$(cap 120)" "${PYTEST[@]}" -m "" tests/test_engine_contract.py >"$OUT/contract.log" 2>&1
  note "contract suite: rc=$? $(tail -1 "$OUT/contract.log")"
fi

timeout "$(cap 150)" $PY benchmarks/gpu_check.py bench --model-dir "$MODEL" --device "$DEVICE" ${SMALL:+--small} \
  --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
note "bench: rc=$? $($PY -c '
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d["results"].items():
    if "error" in v:
        print(k, "ERROR", v["error"][:200]); continue
    print(k, "gen tok/s cold %.0f warm %.0f warm-no-cascade %.0f adapter %.0f | train step %.2f s | agree base mean %.2g max %.2g (cascade mean %.2g max %.2g), adapter mean %.2g max %.2g" % (
        v["gen_tok_s_cold"], v["gen_tok_s_warm"], v["gen_tok_s_warm_no_cascade"], v["gen_tok_s_adapter"], v["train_step_s"],
        v["agree_base"]["mean_abs"], v["agree_base"]["max_abs"], v["agree_base_cascade"]["mean_abs"], v["agree_base_cascade"]["max_abs"], v["agree_adapter"]["mean_abs"], v["agree_adapter"]["max_abs"]), end=" || ")
' "$OUT/bench.json" 2>&1)"

CORE=(${CORE_TESTS:-tests/test_trainer.py tests/test_packing.py tests/test_kv_cache.py tests/test_lora_merge.py
  tests/test_resume.py tests/test_lowlevel.py tests/test_training_loop.py tests/test_export.py tests/test_sampling.py
  tests/test_losses.py})
# (the kill -9 tests spawn processes for 40 s and test no device code the others do not)
timeout "$(cap 150)" "${PYTEST[@]}" -m "not slow" -k "not kill_9" "${CORE[@]}" >"$OUT/tests.log" 2>&1
note "core tests: rc=$? $(tail -1 "$OUT/tests.log")"

if [ -z "${SKIP_SERVER:-}" ]; then
  SERVER=(${SERVER_TESTS:-tests/test_server.py tests/test_structured_outputs.py})
  timeout "$(cap 100)" "${PYTEST[@]}" "${SERVER[@]}" >"$OUT/server_tests.log" 2>&1
  note "server tests (random weights): rc=$? $(tail -1 "$OUT/server_tests.log")"
fi
# On random weights the model rambles: these failed in the CPU rehearsal for that reason alone (the text,
# not the server); any other failure is news.
RANDOM_WEIGHT_FAILURES='test_server.py::(test_tool_call_round_trip|test_streamed_tool_call|test_finish_reasons|test_stop_string|test_whitespace_kept_verbatim)( |$)|test_structured_outputs.py::test_forced_tool_calls_always_parse_and_fit_their_schema\['
other=$(grep -shE "^(FAILED|ERROR) " "$OUT/contract.log" "$OUT/tests.log" "$OUT/server_tests.log" | grep -vE "$RANDOM_WEIGHT_FAILURES")
note "failures other than the random-weight ones: ${other:-none}"
note "done"
