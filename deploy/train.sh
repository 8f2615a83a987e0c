#!/bin/sh
# Entrypoint of the `train` image: split the photos mounted at /data ($FOOD_CLASSIFIER_DATA, one
# folder per class), train, and publish the bundle into the mounted /models. Extra arguments go to
# `food-classifier train` (e.g. --arch efficientnet_lite0 --name food).
set -eu
mkdir -p /work/data
food-classifier data prepare --manifest /work/data/manifest.csv
exec food-classifier train --manifest /work/data/manifest.csv --models-dir /models --runs-dir /work/runs "$@"
