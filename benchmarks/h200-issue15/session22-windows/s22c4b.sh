#!/usr/bin/env bash
set -uo pipefail
mkdir -p /tmp/duo "$OUT"
cp .gpu/m2/p /tmp/duo/m2 && ls -la /tmp/duo
