#!/usr/bin/env bash
# Installs lqf_exp and everything its tests need, on a fresh Debian/Ubuntu machine or in a virtualenv.
# Fashion-MNIST comes from the Debian package when apt-get is usable (root); otherwise torchvision downloads it.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
fi
python -m pip install -q -e ".[test,launchers]"
