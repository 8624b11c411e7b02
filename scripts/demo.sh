#!/usr/bin/env bash
# The demo curation (what `make demo` runs): generate a demo dataset with planted defects, curate it with
# the embedded CPU models through `pyflyte run` (local execution, real local Ray cluster), then score the
# run against the generator's ground truth. Offline; everything lands in $DEMO_OUT (default demo_out/).
set -euo pipefail
export PYTHONWARNINGS="ignore::UserWarning:click.core,ignore::UserWarning:flytekit.clis.sdk_in_container.run"
# OpenMP threads that wait for each other sleep instead of spinning (same thread count, so the same float reduction
# order and the same results): on a busy 2-core machine spinning threads wait for a descheduled partner, and the
# tiny models' many small parallel regions then took 4-35x longer (docs/demo.md, "where the time goes").
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${DEMO_OUT:-demo_out}
N=${DEMO_N:-300}
rm -rf "$OUT/run" "$OUT/ablation"  # no stale pages or tables from an earlier run
mkdir -p "$OUT"
t0=$(date +%s)
# Seconds per phase, printed at the end (docs/demo.md: where the time goes).
timings=()
phase() { local now; now=$(date +%s); timings+=("$1 $(( now - ${tp:-$t0} ))s"); tp=$now; }
# One local Ray cluster for the whole demo (core/demo/ray_host.py), starting while the data is generated: every
# embed task joins it through RAY_ADDRESS instead of starting and stopping a cluster of its own. Stopped on exit
# by its process id. DEMO_SHARED_RAY=0 (or a RAY_ADDRESS of your own) skips it.
ray_pid=""
if [ -z "${RAY_ADDRESS:-}" ] && [ "${DEMO_SHARED_RAY:-1}" = 1 ]; then
  ray_file="$OUT/.ray_address"
  rm -f "$ray_file"
  python -m core.demo.ray_host "$ray_file" > "$OUT/ray_host.log" 2>&1 &
  ray_pid=$!
  trap 'if [ -n "$ray_pid" ]; then kill -TERM "$ray_pid" 2>/dev/null; wait "$ray_pid" 2>/dev/null || true; fi' EXIT
fi
# Benchmark caches in their published layouts (tiny, drawn): the eval sets of decontamination and of the
# ablation's evaluations. The demo data gets a few copies of their items planted (eval contamination).
# (the folder travels as argv: a path pasted into Python source would be run as code if it held a quote)
# A separate, trusted reference set (clean samples of another seed) trains the perplexity reference LM,
# as DFN trains its filter on trusted data: an LM trained on the data it scores learns its defects too.
# (generated beside the fixtures and the demo set: it depends on neither)
python -m core.demo --out "$OUT/reference" --n 300 --seed 1 --no-corrupt > "$OUT/.reference.log" 2>&1 &
ref_pid=$!
python -c "import sys; from core.demo.eval_fixtures import write_fixtures; write_fixtures(sys.argv[1])" "$OUT/eval_cache"
python -m core.demo --out "$OUT/data" --n "$N" --seed 0 --contaminate-from "$OUT/eval_cache"
wait "$ref_pid" || { cat "$OUT/.reference.log" >&2; echo "demo: generating the reference set failed" >&2; exit 1; }
cat "$OUT/.reference.log"
if [ -n "$ray_pid" ]; then
  until [ -s "$ray_file" ]; do
    kill -0 "$ray_pid" 2>/dev/null || { echo "demo: the Ray cluster did not start:" >&2; cat "$OUT/ray_host.log" >&2; exit 1; }
    sleep 0.2
  done
  export RAY_ADDRESS RAY_AUTH_MODE
  { read -r RAY_ADDRESS; read -r RAY_AUTH_MODE; } < "$ray_file"
fi
phase "data"
pyflyte --config flyte.config run workflows/curate.py curate \
  --source "$OUT/data/data.json" --image_root "$OUT/data/images" \
  --reference_source "$OUT/reference/data.json" --reference_image_root "$OUT/reference/images" \
  --reference_ids "$OUT/reference/ground_truth.json" --eval_cache "$OUT/eval_cache" \
  --config "{\"decontam\": true, \"rephrase\": $( [ "${DEMO_REPHRASE:-1}" = 1 ] && echo true || echo false )}" \
  --output_dir "$OUT/run"
echo "== run summary ($OUT/run/summary.json)"
python - "$OUT/run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for x in s["steps"]:
    print(f"  {x['step']:<11} in={x['inputs']:<5} kept={x['kept']:<5} modified={x['modified']:<4} "
          f"dropped={x['dropped']:<4} quarantined={x['quarantined']}")
print(f"  curated samples: {s['final_samples']} -> {sys.argv[1].rsplit('/', 1)[0]}/export/shards")
print("  reasons:")
for r in s["reasons"]:
    print(f"    {r['step']:<11} {r['decision']:<10} {r['reason']:<32} {r['count']}")
PY
echo "== scored against the planted defects"
python -m core.demo.score --ground-truth "$OUT/data/ground_truth.json" --ledger "$OUT/run/ledger.parquet"
phase "curate"
if [ "${DEMO_ABLATE:-1}" = 1 ]; then
  # The team's habit, in miniature: each algorithm in isolation -> export -> train -> capped eval -> compare.
  echo "== ablation grid: baseline vs semdedup@0.1 vs ppl@0-90 vs decontam (train a few steps each, eval with cap 2)"
  pyflyte --config flyte.config run workflows/ablate.py ablate \
    --source "$OUT/data/data.json" --image_root "$OUT/data/images" \
    --reference_source "$OUT/reference/data.json" --reference_image_root "$OUT/reference/images" \
    --reference_ids "$OUT/reference/ground_truth.json" \
    --variants '["baseline", "semdedup@0.1", "ppl@0-90", "decontam"]' --eval_cache "$OUT/eval_cache" \
    --config "{\"train_config\": {\"max_steps\": ${DEMO_TRAIN_STEPS:-30}}, \"eval_max_samples\": 8}" --output_dir "$OUT/ablation"
  python - "$OUT/ablation/comparison.csv" <<'PY'
import sys
import pandas as pd
t = pd.read_csv(sys.argv[1])
cols = ["variant", "n_samples", "n_tokens", "tokens_vs_baseline", "mean_score"] + [c for c in t.columns if c.endswith("_delta")]
print(t[cols].round(3).to_string(index=False))
PY
  echo "== early signal: answer NLL paired with the baseline (95% interval; noise = spread of the baseline seeds)"
  python -m core.runs.ablation_compare "$OUT/ablation" --metrics answer_nll val_loss
  phase "ablate"
fi
# Where everything is (what the runs published; listed from the files, not from expectations).
echo "== where things are"
where() { printf '  %-14s %s\n' "$1" "$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; }
where "run summary" "$OUT/run/summary.json"
where "ledger" "$OUT/run/ledger.parquet"
where "export" "$OUT/run/export"
echo "  decks (curate) $(cd "$OUT/run/decks" && pwd)/: $(cd "$OUT/run/decks" && ls *.html | sed 's/\.html$//' | tr '\n' ' ')"
if [ "${DEMO_ABLATE:-1}" = 1 ]; then
  where "comparison" "$OUT/ablation/comparison.csv"
  echo "  decks (ablate) $(cd "$OUT/ablation/decks" && pwd)/: $(cd "$OUT/ablation/decks" && ls *.html | sed 's/\.html$//' | tr '\n' ' ')"
fi
phase "listing"
echo "demo done in $(( $(date +%s) - t0 )) s (${timings[*]}; data: generation and Ray start; curate, ablate: pyflyte"\
" run and the summaries after it)"
# Last line: the page to open first (what happened, the funnel, one card per step linking to its page).
echo "run report: $(cd "$OUT/run/decks" && pwd)/index.html"
