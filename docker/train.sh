#!/bin/sh
# Trainer entry point (docker/Dockerfile.train, compose profile `train`): the reproducible recipe of
# models/configs/default.yaml, writing the ONNX into the models volume.
#   synth (unless a dataset is mounted) -> train -> export to $MGSTREAM_TRAIN_OUT/$MGSTREAM_TRAIN_NAME.onnx
set -eu

OUT="${MGSTREAM_TRAIN_OUT:-/models}"
NAME="${MGSTREAM_TRAIN_NAME:-mgstream-trained}"
WORK="${MGSTREAM_TRAIN_WORK:-/work}"
CONFIG="${MGSTREAM_TRAIN_CONFIG:-/src/models/configs/default.yaml}"
DATA="${MGSTREAM_TRAIN_DATA:-$WORK/synth}"  # SMG layout; a mounted real dataset works the same way
RUN="$WORK/run-$(date +%Y%m%d-%H%M%S)"

if [ ! -d "$DATA" ]; then
  echo "synthesising training data into $DATA"
  mgstream synth "$DATA" --sequences "${MGSTREAM_TRAIN_SEQUENCES:-60}" --seed 0
fi
# shellcheck disable=SC2086  # MGSTREAM_TRAIN_ARGS holds extra options (e.g. --iterations 2000), split on purpose
mgstream train --config "$CONFIG" --data "$DATA" --out "$RUN" --no-progress ${MGSTREAM_TRAIN_ARGS:-}
mgstream export "$RUN/best.pt" --out "$OUT/$NAME.onnx" --name "$NAME"
echo "wrote $OUT/$NAME.onnx; set MGSTREAM_MODEL_PATH=/models/$NAME.onnx for the server and recreate it"
