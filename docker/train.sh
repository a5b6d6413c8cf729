#!/bin/sh
# Trainer entry point (docker/Dockerfile.train, compose profile `train`):
# synthesise data (unless a dataset is mounted), train, export the ONNX into $MGSTREAM_TRAIN_OUT.
set -eu

OUT="${MGSTREAM_TRAIN_OUT:-/models}"
NAME="${MGSTREAM_TRAIN_NAME:-mgstream-trained}"
WORK="${MGSTREAM_TRAIN_WORK:-/work}"
DATA="${MGSTREAM_TRAIN_DATA:-$WORK/synth}"  # SMG layout; a mounted real dataset works the same way
RUN="$WORK/run-$(date +%Y%m%d-%H%M%S)"

if [ ! -d "$DATA" ]; then
  echo "synthesising training data into $DATA"
  mgstream synth "$DATA" --sequences "${MGSTREAM_TRAIN_SEQUENCES:-60}"
fi
# shellcheck disable=SC2086  # MGSTREAM_TRAIN_ARGS holds extra options, split on purpose
mgstream train "$DATA" --out "$RUN" ${MGSTREAM_TRAIN_ARGS:-}
mgstream export "$RUN" --out "$OUT/$NAME.onnx"
echo "wrote $OUT/$NAME.onnx; set MGSTREAM_MODEL_PATH=/models/$NAME.onnx for the server and recreate it"
