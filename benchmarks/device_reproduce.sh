#!/usr/bin/env bash
# The GPU check of scripts/reproduce.py: the paper budget's path (experiment=mnist_paper: DDP
# trainer, batch 800, bf16 where the GPU has it, the paper's evaluation) shortened to fit a few
# minutes on one GPU, then benchmarks/device_check.sh with the time left. Results go to $OUT.
#
#   REPRODUCE_EPOCHS=2 REPRODUCE_ITEMS=1000 REPRODUCE_S=100 bash benchmarks/device_reproduce.sh
#
# Needs MNIST under $FUSIONVAE_DATA_DIR and the wheels of benchmarks/device_check.sh in .whl/ when
# hydra-core etc. are missing. A classifier file already in <log dir>/reproduce/paper/ is reused.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/device_reproduce.XXXXXX)}
LOGS=${FUSIONVAE_LOG_DIR:-logs}
if ! "$PY" -c "import hydra, omegaconf, antlr4, lmdb" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 4
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
START=$SECONDS
timeout -k 10 "${REPRODUCE_LIMIT_S:-330}" "$PY" scripts/reproduce.py mnist --budget paper --runs fusionvae,cvae,fcn \
  --eval-items "${REPRODUCE_ITEMS:-1000}" --iw-samples "${REPRODUCE_S:-100}" --out "$OUT/docs" --log-dir "$LOGS" \
  trainer.devices=1 "trainer.max_epochs=${REPRODUCE_EPOCHS:-2}"
rc=$?
echo "reproduce.py: exit $rc after $((SECONDS - START)) s"
[ $rc = 0 ] || tail -n 30 "$LOGS"/reproduce/paper/logs/*.log
cp "$OUT/docs/results.md" "$OUT/results_gpu.md" 2>/dev/null
cp "$OUT/docs/results/mnist_comparison.png" "$OUT/comparison_gpu.png" 2>/dev/null
rm -rf "$OUT/docs"
LEFT=$(( ${DEVICE_CHECK_TOTAL_S:-560} - (SECONDS - START) ))
if [ "$LEFT" -gt 60 ]; then
  OUT=/tmp/device_check_out DEVICE_CHECK_BUDGET_S=$LEFT bash benchmarks/device_check.sh > "$OUT/device_check.log" 2>&1
  cp /tmp/device_check_out/table.md /tmp/device_check_out/results.jsonl "$OUT/" 2>/dev/null
  tail -n 30 "$OUT/device_check.log"
fi
exit $rc
