#!/usr/bin/env bash
# Build the course's grading environment in DIR: Python 3.10 and the package versions of the
# course rules (Rules - Environment, Rules - Packages), CPU wheels where the index has them,
# and nothing of difflab's own. Usage: bash tools/course_env.sh DIR
#   then: PATH="DIR/bin:$PATH" bash hw2_1.sh OUT   (python3 there is the course's Python)
# Python 3.10 is taken from $COURSE_PYTHON, else `python3.10` on PATH, else pyenv's 3.10.
# The environment is rebuilt only when DIR/course-env.ok is missing or names other pins.
# PyPI's torch 1.11.0 wheel for Python 3.10 is the CUDA 10.2 build (about 750 MB); it runs on the CPU.
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
# DIR is removed before a rebuild: refuse a folder that holds anything but an environment.
if [ -e "$dir" ] && [ ! -d "$dir" ]; then
    echo "course_env.sh: $dir is a file, not a folder" >&2
    exit 2
fi
if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ] && [ ! -f "$dir/pyvenv.cfg" ]; then
    echo "course_env.sh: $dir exists and is not a Python environment; choose an empty or new folder" >&2
    exit 2
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
# A build that fails or is interrupted removes DIR, so nothing half-built is left; the
# stamp file is written last and marks a complete environment.
rm -rf "$dir"
trap 'rm -rf "$dir"' ERR
trap 'rm -rf "$dir"; exit 130' INT TERM
"$python" -m venv "$dir"
"$dir/bin/python3" -m pip install --quiet --upgrade "pip<24"
"$dir/bin/python3" -m pip install --quiet "${pins[@]}"
trap - ERR INT TERM
echo "$stamp" > "$dir/course-env.ok"
"$dir/bin/python3" -c 'import sys, torch, transformers, numpy, PIL; print("course environment ready:", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__, "Pillow", PIL.__version__)'
