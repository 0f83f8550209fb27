#!/usr/bin/env bash
# The Debian packages kiln's tests and reports use, installed when missing:
#   graphviz  - `dot` renders the graph pictures in `kiln report`
#   chromium  - the browser test opens the report headless
#   espeak-ng - speaks the sentences the silero-vad accuracy test and benchmark feed it (real speech)
# Without root or apt-get it only says what is missing; the tests that need a package then
# skip with that reason.
set -u
need=()
command -v dot >/dev/null 2>&1 || need+=(graphviz)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "kiln: installing ${need[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || echo "kiln: could not install ${need[*]}; the tests that need them skip"
else
  echo "kiln: ${need[*]} not installed (needs root and apt-get); the tests that need them skip"
fi
exit 0
