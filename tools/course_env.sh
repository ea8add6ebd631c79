#!/usr/bin/env bash
# Build the course's grading environment in DIR: Python 3.10 and the package versions of the
# course rules (Rules - Environment, Rules - Packages), CPU wheels where the index has them,
# and nothing of difflab's own. Usage: bash tools/course_env.sh DIR
#   then: PATH="DIR/bin:$PATH" bash hw2_1.sh OUT   (python3 there is the course's Python)
# Python 3.10 is taken from $COURSE_PYTHON, else `python3.10` on PATH, else pyenv's 3.10.
# The environment is rebuilt only when DIR/course-env.ok is missing or names other pins.
set -euo pipefail
if [ "$#" -ne 1 ]; then
    echo "usage: bash tools/course_env.sh DIR" >&2
    exit 2
fi
dir="$1"
pins=(
    "numpy==1.24.4" "torch==1.11.0" "torchvision==0.12.0" "transformers==4.19.2"
    "timm==0.8.19.dev0" "pandas==2.0.3" "matplotlib==3.7.0" "Pillow==10.4.0"
    "imageio==2.9.0" "scipy==1.9.1" "scikit-image==0.20.0" "tqdm" "gdown" "pyyaml"
)
stamp="${pins[*]}"
if [ -f "$dir/course-env.ok" ] && [ "$(cat "$dir/course-env.ok")" = "$stamp" ]; then
    echo "course environment ready: $dir"
    exit 0
fi
python="${COURSE_PYTHON:-}"
if [ -z "$python" ]; then
    if command -v python3.10 >/dev/null 2>&1 && python3.10 -c '' 2>/dev/null; then
        python=python3.10
    elif command -v pyenv >/dev/null 2>&1 && pyenv prefix 3.10 >/dev/null 2>&1; then
        python="$(pyenv prefix 3.10)/bin/python3.10"
    else
        echo "course_env.sh: no Python 3.10 found; set COURSE_PYTHON=/path/to/python3.10" >&2
        exit 2
    fi
fi
if ! "$python" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
    echo "course_env.sh: $python is not Python 3.10" >&2
    exit 2
fi
# Build beside DIR and move into place, so a failed build leaves no half environment.
rm -rf "$dir.partial"
"$python" -m venv "$dir.partial"
"$dir.partial/bin/python3" -m pip install --quiet --upgrade "pip<24"
"$dir.partial/bin/python3" -m pip install --quiet "${pins[@]}"
# The venv's scripts name their folder; recreate it in place after the move.
rm -rf "$dir"
mv "$dir.partial" "$dir"
"$python" -m venv --upgrade "$dir" >/dev/null
sed -i "s|$dir.partial|$dir|g" "$dir"/bin/* 2>/dev/null || true
echo "$stamp" > "$dir/course-env.ok"
"$dir/bin/python3" -c 'import sys, torch, transformers, numpy, PIL; print("course environment ready:", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__, "Pillow", PIL.__version__)'
