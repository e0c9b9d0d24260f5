#!/usr/bin/env bash
# `make test`'s set-up for the browser test of `diffret serve` (tests/test_serve_browser.py):
# install Debian's chromium and chromium-driver when they are missing and this runs as root with
# apt-get. Never fails `make test` itself: where the packages cannot be installed, the browser test
# skips with the reason, and under CI (CI=true) that skip is a failure.
set -u
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver for the browser test (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; then
        exit 0
    fi
    echo "could not install chromium / chromium-driver: the browser test will be skipped (a failure under CI=true)"
else
    echo "chromium / chromium-driver missing and not root with apt-get: the browser test will be skipped" \
         "(a failure under CI=true); install them with: sudo apt-get install chromium chromium-driver"
fi
exit 0
