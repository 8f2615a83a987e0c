#!/bin/sh
# Builds the serving venv /opt/venv in an image build (the Containerfile's build and build-full stages),
# in two steps so the dependency layer survives code changes:
#   build-venv.sh deps EXTRAS   pyproject.toml's dependencies with these extras (an empty package and README)
#   build-venv.sh app [MODULE]  the package itself, no dependencies; then trims what serving never loads
#                               (pip, test suites, ONNX Runtime's Python tooling: -60 MB), keeps bytecode
#                               only for what a server start imports, and checks that it (and MODULE) import
set -eu
step=$1
shift
case "$step" in
deps)
  python -m venv /opt/venv
  mkdir -p food_classifier && touch food_classifier/__init__.py README.md  # the real ones come with `app`
  /opt/venv/bin/pip install ".[$1]"
  /opt/venv/bin/pip uninstall -y food-classifier
  ;;
app)
  /opt/venv/bin/pip install --no-deps .
  /opt/venv/bin/pip uninstall -y -q pip setuptools wheel
  site=/opt/venv/lib/python3.11/site-packages
  rm -rf "$site/onnxruntime/transformers" "$site/onnxruntime/tools" "$site/onnxruntime/quantization" \
         "$site/onnxruntime/datasets" "$site/onnxruntime/backend"
  find /opt/venv -depth \( -name tests -o -name __pycache__ \) -type d -exec rm -rf {} +
  modules="food_classifier.cli, food_classifier.cli.serve, food_classifier.serving.http.app, uvicorn.main,"
  modules="$modules uvicorn.loops.auto, uvicorn.protocols.http.auto, uvicorn.protocols.websockets.auto,"
  modules="$modules uvicorn.lifespan.on, onnxruntime, PIL.Image, numpy"
  for m in "$@"; do modules="$modules, $m"; done
  /opt/venv/bin/python -c "import $modules"
  ;;
*)
  echo "usage: build-venv.sh deps EXTRAS | app [MODULE...]" >&2
  exit 2
  ;;
esac
