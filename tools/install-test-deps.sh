#!/usr/bin/env bash
# System pieces the test suite needs beyond pip: Debian's chromium (headless browser
# tests) and the Jupyter widget JavaScript from npm (rendering widgets offline).
# Idempotent: does nothing that is already done.
#
# Usage: tools/install-test-deps.sh [PYTHON]
# Puts the html-manager at .cache/npm/html-manager/dist/{embed.js,embed-amd.js}
# (tests/browser/conftest.py looks for it there; .cache/ is gitignored).
set -euo pipefail
PY=${1:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
npm_cache="$here/.cache/npm"
HTML_MANAGER_VERSION=1.0.15

if ! command -v chromium > /dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    # Quiet unless it fails: then show what apt said.
    if ! log=$($SUDO apt-get update -qq 2>&1 &&
               DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium 2>&1); then
        echo "$log" >&2
        exit 1
    fi
fi

# npm_unpack SPEC TARBALL DIR FILE...: extract FILEs (paths inside the tarball's package/
# folder) of the npm package SPEC into DIR. The tarball is kept in .cache/npm/ under the
# name `npm pack` gives it (tools/fetch-docs-js.sh reuses it), so it is fetched once.
npm_unpack() {
    local spec=$1 tarball=$2 dir=$3
    shift 3
    local file ready=1
    for file in "$@"; do [ -s "$dir/$file" ] || ready=0; done
    [ "$ready" = 1 ] && [ "$(cat "$dir/.spec" 2> /dev/null)" = "$spec" ] && return 0
    command -v npm > /dev/null 2>&1 || { echo "install-test-deps: npm is needed (apt-get install npm)" >&2; exit 1; }
    mkdir -p "$npm_cache"
    if [ ! -s "$npm_cache/$tarball" ]; then
        (cd "$npm_cache" && npm pack --silent "$spec" > /dev/null)
    fi
    [ -s "$npm_cache/$tarball" ] || { echo "install-test-deps: npm pack $spec did not give $tarball" >&2; exit 1; }
    local staging
    staging=$(mktemp -d)
    local members=()
    for file in "$@"; do members+=("package/$file"); done
    tar -xzf "$npm_cache/$tarball" -C "$staging" "${members[@]}"
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$staging/package" && cp --parents "$@" "$dir/")
    echo "$spec" > "$dir/.spec"
    rm -rf "$staging"
}

# Renders saved widget state in a static page (ipywidgets.embed) from file://.
npm_unpack "@jupyter-widgets/html-manager@$HTML_MANAGER_VERSION" \
    "jupyter-widgets-html-manager-$HTML_MANAGER_VERSION.tgz" "$npm_cache/html-manager" \
    dist/embed.js dist/embed-amd.js

# The kernel JupyterLab starts in the browser tests must be this environment's python.
"$PY" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ['ipykernel', 'jupyterlab', 'playwright'])))" || {
    echo "install-test-deps: $PY lacks ipykernel/jupyterlab/playwright; pip install -e '.[test]' first" >&2
    exit 1
}
