#!/usr/bin/env bash
# Fetch Fashion-MNIST (Debian's dataset-fashion-mnist) into DEST without installing it system-wide.
# Usage: scripts/fetch_fashion_mnist.sh DEST   (DEST/*-idx?-ubyte.gz afterwards)
set -euo pipefail
dest=${1:?usage: fetch_fashion_mnist.sh DEST}
if [ -f "$dest/t10k-labels-idx1-ubyte.gz" ]; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get -qq -o APT::Sandbox::User=root download dataset-fashion-mnist 2>/dev/null; then
  apt-get -qq update
  apt-get -qq -o APT::Sandbox::User=root download dataset-fashion-mnist
fi
dpkg-deb -x dataset-fashion-mnist_*.deb x
cd - >/dev/null
mkdir -p "$dest"
cp "$work"/x/usr/share/datasets/fashion-mnist/*.gz "$dest/"
echo "fetched Fashion-MNIST into $dest"
