#!/bin/sh
# Fashion-MNIST for `make demo` and `make reproduce-table1 BUDGET=smoke`, tried in order: a local
# copy (data/, Debian's package), a download checked against the published MD5s, and, on an
# offline Debian machine when run as root, Debian's dataset-fashion-mnist package (a package
# manager only ever runs here, never when gradtrace is imported). When all of that fails, the
# demo itself stops with one message listing the ways to provide the data.
# Usage: scripts/fetch-demo-data.sh PYTHON
set -u
python=${1:-python3}
"$python" -m gradtrace.studies.demo --fetch-data && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST: not found and not downloadable; installing Debian's dataset-fashion-mnist with apt-get"
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || echo "Fashion-MNIST: apt-get could not install dataset-fashion-mnist"
fi
exit 0
