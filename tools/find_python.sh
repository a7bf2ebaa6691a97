#!/usr/bin/env bash
# Print the path of a Python >= 3.12 for the virtual environment, or explain what is missing.
# A committed .python-version selects a pyenv version; otherwise python3.13/3.12/python3 on PATH.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
if [ -f .python-version ] && command -v pyenv >/dev/null 2>&1; then
  candidate=$(PYENV_VERSION=$(head -n1 .python-version) pyenv which python 2>/dev/null)
  if [ -n "$candidate" ] && ok "$candidate"; then echo "$candidate"; exit 0; fi
fi
for name in python3.13 python3.12 python3; do
  candidate=$(command -v "$name" 2>/dev/null) || continue
  if ok "$candidate"; then echo "$candidate"; exit 0; fi
done
echo "jaxserve needs Python >= 3.12 (jax >= 0.11 requires it). Install one, or with pyenv run" \
     "'pyenv install 3.12' and keep a .python-version naming it in the repo root." >&2
exit 1
