#!/bin/sh
# Slim a virtual environment in place, for the runtime stage of an image.
#
#   slim-venv.sh [--system-caches] VENV [MODULE ...]
#
# What goes, and why it may go (docs/IMAGES.md has the measured effect of each step):
#   - debug symbols of shared objects (strip --strip-unneeded; skipped when strip is missing)
#   - tests/ and test/ folders of installed packages
#   - type stubs (*.pyi, py.typed) and extension sources (*.c *.h *.pyx *.pxd *.pxi)
#   - *.dist-info folders, cut down to a METADATA with Metadata-Version, Name and Version (the
#     worker reads its own version there for build_info), plus entry_points.txt when it registers
#     plugins (a group other than console_scripts, gui_scripts and pyinstaller40)
#   - every *.pyc but *.opt-2.pyc: the packages are compiled with `python -OO`, the bytecode that
#     PYTHONOPTIMIZE=2 reads; plain and opt-1 bytecode would never be used
# Then each MODULE is imported with -OO: a slimmed venv that cannot import its entry point fails
# the build here, not at the first start. When PYTHONPYCACHEPREFIX is set (it must point inside
# VENV), all bytecode goes there, and the import also leaves the opt-2 bytecode of every standard
# library module the entry point needs: the official python images ship the stdlib without any.
# With --system-caches (the image builder only, never on a developer machine): /root/.cache, /tmp
# and /var/tmp are emptied too.
#
# POSIX sh for Alpine's busybox; runs on a glibc venv as well. Safe to run twice.
set -eu

system_caches=0
if [ "${1:-}" = "--system-caches" ]; then
    system_caches=1
    shift
fi
if [ $# -lt 1 ]; then
    echo "usage: $0 [--system-caches] VENV [MODULE ...]" >&2
    exit 2
fi
venv=${1%/}
shift
python="$venv/bin/python"
if [ ! -x "$python" ]; then
    echo "slim-venv: no python at $python" >&2
    exit 2
fi
prefix=${PYTHONPYCACHEPREFIX:-}
case "$prefix" in
    "" | "$venv"/*) ;;
    *)
        echo "slim-venv: PYTHONPYCACHEPREFIX=$prefix is outside $venv: its bytecode would not ship" >&2
        exit 2
        ;;
esac
# -I: neither the caller's PYTHON* variables nor its working directory leak in
if [ -n "$prefix" ]; then
    py() { "$python" -I -X "pycache_prefix=$prefix" "$@"; }
else
    py() { "$python" -I "$@"; }
fi
site=$(py -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
case "$site" in
    "$venv"/*) ;;
    *)
        echo "slim-venv: $site is not inside $venv" >&2
        exit 2
        ;;
esac

size_kib() { du -sk "$1" | cut -f1; }
before=$(size_kib "$venv")

# 1. debug symbols. strip rewrites a file in place when it has other hard links, and a venv that uv
# installed from its cache is hard-linked into that cache: give such files a copy of their own first.
if command -v strip >/dev/null 2>&1; then
    find "$site" -type f \( -name '*.so' -o -name '*.so.*' \) -links +1 -exec sh -c \
        'for f do cp -p "$f" "$f.slim" && mv -f "$f.slim" "$f"; done' sh {} +
    find "$site" -type f \( -name '*.so' -o -name '*.so.*' \) -exec strip --strip-unneeded {} +
else
    echo "slim-venv: strip not found, shared objects left unstripped" >&2
fi

# 2. test suites shipped inside packages
find "$site" -mindepth 1 -type d \( -name tests -o -name test \) -prune -exec rm -rf {} +

# 3. stubs and extension sources
find "$site" -type f \( -name '*.pyi' -o -name py.typed -o -name '*.c' -o -name '*.h' \
    -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \) -exec rm -f {} +

# 4. distribution metadata
for dist in "$site"/*.dist-info; do
    [ -d "$dist" ] || continue
    # the headers end at the first empty line; keep the three that identify the distribution
    sed -n -e '/^$/q' -e '/^Metadata-Version:/p' -e '/^Name:/p' -e '/^Version:/p' \
        "$dist/METADATA" >"$dist.METADATA"
    if [ -f "$dist/entry_points.txt" ] && grep '^\[' "$dist/entry_points.txt" |
        grep -qv -e '^\[console_scripts\]' -e '^\[gui_scripts\]' -e '^\[pyinstaller40\]'
    then
        find "$dist" -mindepth 1 -maxdepth 1 ! -name entry_points.txt -exec rm -rf {} +
    else
        find "$dist" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
    fi
    mv "$dist.METADATA" "$dist/METADATA"
done

# 5. bytecode: opt-2 only, then the entry points imported (which also caches their stdlib)
if [ -n "$prefix" ]; then
    # Python reads nothing from __pycache__ while a prefix is set
    find "$site" -type d -name __pycache__ -prune -exec rm -rf {} +
fi
py -OO -m compileall -q "$site" # one process: workers would not inherit the prefix
if [ $# -gt 0 ]; then
    imports=$(printf 'import %s;' "$@")
    if [ -n "$prefix" ]; then
        py -OO -c "$imports"
    else
        py -OO -B -c "$imports" # no prefix: never write into the interpreter's own stdlib
    fi
fi
find "$venv" -type f \( -name '*.pyo' -o -name '*.pyc' \) ! -name '*.opt-2.pyc' -exec rm -f {} +

# 6. caches of the build itself (image builder only)
if [ "$system_caches" -eq 1 ]; then
    rm -rf /root/.cache
    for dir in /tmp /var/tmp; do
        if [ -d "$dir" ]; then
            find "$dir" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
        fi
    done
fi

echo "slim-venv: $venv ${before} KiB -> $(size_kib "$venv") KiB"
