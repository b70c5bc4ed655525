#!/usr/bin/env bash
# Create ./.venv and install detfocal (editable) with its test and docs extras. Safe to run
# twice: it reinstalls only when setup.cfg or pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.detfocal-installed"
want="$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import detfocal, pytest, hypothesis, mkdocs" 2>/dev/null; then
    echo "bootstrap: .venv is up to date"
    exit 0
fi
echo "bootstrap: installing detfocal and its dependencies into .venv (torch is large; first time takes a minute or two)"
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet -e ".[test,docs]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import detfocal, torch, torchvision, pycocotools, pytest, mkdocs; print('bootstrap: detfocal', detfocal.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
echo "$want" > "$stamp"
