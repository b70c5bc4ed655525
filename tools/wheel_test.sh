#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it into a fresh environment, and from
# an empty folder outside the checkout train a shipped config by name, evaluate, draw, export
# and benchmark with the installed `detfocal` command. Catches what the checkout hides: files
# missing from the wheel (configs, py.typed) and paths relative to the repository.
#
# The fresh environment reuses the bootstrap's dependencies instead of downloading torch again:
# a venv without pip whose site-packages holds a .pth line naming .venv's site-packages. Python
# adds that folder to sys.path after the venv's own, and does not process the .pth files in it,
# so .venv's editable install of the checkout stays invisible: `import detfocal` finds the wheel.
#
#   bash tools/wheel_test.sh            # after tools/bootstrap.sh; KEEP=1 keeps the temp folder
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="$ROOT/.venv/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/detfocal-wheel.XXXXXX")"
if [ "${KEEP:-0}" = 1 ]; then echo "wheel test: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
step() { echo "wheel test: $*"; }

step "building the wheel"
"$PY" -m pip wheel --no-deps --no-build-isolation --quiet --wheel-dir "$WORK/dist" . 2>&1 \
    | grep -v "^WARNING: Location" || true
WHEEL="$(ls "$WORK"/dist/detfocal-*.whl)"
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
wanted = ["detfocal/py.typed", "detfocal/configs/shapes_retinanet_r18.yaml",
          "detfocal/configs/ablations/shapes_gamma0.yaml", "detfocal/configs/__init__.py"]
missing = [name for name in wanted if name not in names]
licence = [name for name in names if name.endswith(("LICENSE", "licenses/LICENSE"))]
if missing or not licence:
    sys.exit(f"wheel test: the wheel lacks {missing or 'LICENSE'}")
print(f"wheel test: {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, configs, py.typed and LICENSE included")
EOF

step "installing it into a fresh venv on top of .venv's dependencies"
"$PY" -m venv --without-pip "$WORK/venv"
VENV_SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$VENV_SITE/detfocal-bootstrap-deps.pth"
"$WORK/venv/bin/python" -m pip install --no-deps --quiet "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
export PATH="$WORK/venv/bin:$PATH"
mkdir "$WORK/user"
cd "$WORK/user"  # an empty folder: nothing of the checkout is reachable from here
python - "$WORK/venv" <<'EOF'
import sys, detfocal
assert detfocal.__file__.startswith(sys.argv[1]), f"detfocal imported from {detfocal.__file__}, not the wheel"
print(f"wheel test: detfocal {detfocal.__version__} from {detfocal.__file__}")
EOF
[ "$(command -v detfocal)" = "$WORK/venv/bin/detfocal" ] || { echo "wheel test: detfocal is not the venv's command"; exit 1; }

# A run of seconds: 8 tiny shapes images, a thin model, 2 iterations.
TINY=("data.shapes={root: data/shapes, num_train: 8, num_val: 4, image_size: 64, min_object_size: 6, max_objects: 3}"
      model.min_size=64 model.max_size=64 model.fpn_channels=32 model.head.num_convs=1 model.head.norm=none
      train.batch_size=4 train.epochs=1 train.max_iters=2 train.warmup_iters=1 train.amp=off train.log_interval=1
      data.workers=0 eval.batch_size=4)
step "detfocal train shapes_retinanet_r18 (a shipped config, by name)"
detfocal train shapes_retinanet_r18 --set "${TINY[@]}"
RUN=runs/shapes_retinanet_r18
for file in metrics.jsonl log.txt config.yaml last.pth best.pth; do
    [ -f "$RUN/$file" ] || { echo "wheel test: $RUN/$file was not written"; exit 1; }
done
step "detfocal eval"
detfocal eval "$RUN/best.pth"
step "detfocal infer"
detfocal infer "$RUN/best.pth" "$(ls data/shapes/val/*.png | head -n 1)" --out drawn
step "detfocal export"
detfocal export "$RUN/best.pth" --out model.onnx
[ -s model.onnx ] || { echo "wheel test: model.onnx was not written"; exit 1; }
step "detfocal benchmark --quick"
detfocal benchmark --quick
step "passed"
