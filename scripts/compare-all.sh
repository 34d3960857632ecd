#!/usr/bin/env bash
# The honest-scale comparison of docs/training.md, every row, on one or both preference sets. Each row and
# stage is cached in the work folder (~/.cache/rahf/runs), so a rerun computes only what is missing and an
# interrupted run resumes from its last checkpoint.
#
#   bash scripts/compare-all.sh [hh_harmless|alpaca_helpful|all]   # default: all, one set after the other
#   SEEDS=0,1,2 bash scripts/compare-all.sh hh_harmless            # also seeds 1 and 2 of the shipped row
#   DRY=1 bash scripts/compare-all.sh                              # print the commands only
#   CACHED=1 bash scripts/compare-all.sh                           # report what runs finished; compute nothing
#
# One process uses one core (--threads 1). To use two, run two processes on different rows, each with its
# own report folder, then merge their finished rows into the real report:
#   ROWS_OVERRIDE=unsteered,rahf-scit,rahf-scit-rank OUT=/tmp/cmp-scit/hh_harmless bash scripts/compare-all.sh hh_harmless &
#   ROWS_OVERRIDE=rahf-dual-lora SEEDS=0,1,2 OUT=/tmp/cmp-seeds/hh_harmless bash scripts/compare-all.sh hh_harmless &
#   CACHED=1 SEEDS=0,1,2 bash scripts/compare-all.sh hh_harmless  # later: every finished row, one report
# (each row's profile is kept in the work folder too: the CACHED=1 report copies every finished row's file
# into profiles/comparison/<set>/profiles, named <set>-<row>-seed<k>.safetensors; a row this machine's work
# folder lacks, but the committed report of the same settings holds, is carried over from that report as it was,
# so rows finished on another machine are kept)
#
# The rows run with every seed are the kinds each set ships: the RAHF row (hh_harmless rahf-dual-lora for
# `harmless`, alpaca_helpful rahf-dual for `helpful`) and the pref row (hh_harmless pref-rank, the kind of
# `harmless-pref`; alpaca_helpful pref, the kind of `helpful-pref`). The pref rows use the comparison's shared
# settings, not the shipped -pref files' own (profiles/README.md). Reports go to profiles/comparison/<set>/.
# Needs ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
RAHF=${RAHF:-.venv/bin/rahf}
ROWS=unsteered,prompt-good,mean,caa,pca,rahf-scit,rahf-scit-rank,rahf-dual,rahf-dual-rank,rahf-dual-lora,pref,pref-rank,dual-sft
declare -A SEED_ROWS=([hh_harmless]=rahf-dual-lora,pref-rank [alpaca_helpful]=rahf-dual,pref)

one() {
  local set=$1
  local command=("$RAHF" compare --data "../shared/data/$set" --out "${OUT:-profiles/comparison/$set}"
    --title "$set: every method on the same pairs" --method dual --alpha 1 --fit-init shift --eval-pairs 1000
    --calib-pairs 48 --strengths 0.5,1,2 --threads "${THREADS:-1}" --bf16 off --rows "${ROWS_OVERRIDE:-$ROWS}"
    --seeds "${SEEDS:-0}" --seed-rows "${SEED_ROWS[$set]}" ${CACHED:+--cached-only})
  echo "${command[*]}"
  [ -n "${DRY:-}" ] || "${command[@]}"
}

case "${1:-all}" in
  hh_harmless|alpaca_helpful) one "$1" ;;
  all) one hh_harmless; one alpaca_helpful ;;
  *) echo "usage: bash scripts/compare-all.sh [hh_harmless|alpaca_helpful|all]" >&2; exit 2 ;;
esac
