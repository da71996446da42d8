#!/bin/bash
# Queue benchmark of two commits side by side, alternating, 3 rounds each (same config):
#   benchmarks/compare_commits.sh OLD_TREE NEW_TREE OUT_DIR
# Each tree is a checkout (e.g. `git worktree add --detach /tmp/old <commit>`); the
# benchmark of each tree runs its own code (PYTHONPATH) against its own Redis and smtp-sink.
set -u
old=$1; new=$2; out=$3
mkdir -p "$out"
py=${PYTHON:-python3}
for round in 1 2 3; do
  for tree in "$old" "$new"; do
    name=$(basename "$tree")
    PYTHONPATH=$tree timeout 600 "$py" "$tree/benchmarks/bench_queue.py" \
      -n 3000 --pools threads,prefork --latencies 0 --systems mailworker --modes backlog \
      --skip-enqueue --send-calls 10 --json "$out/$name-$round.json" > "$out/$name-$round.log" 2>&1
    echo "$name round $round: $(grep 'delivery (backlog)' "$out/$name-$round.log" | tr '\n' ' ')"
  done
done
