#!/usr/bin/env bash
# The JavaScript the docs need to render saved widget state offline, from npm:
#   @jupyter-widgets/html-manager  dist/embed-amd.js (+ its font files)  BSD-3-Clause
#   requirejs                      require.js                            MIT
# Tarballs are kept in .cache/npm/ (shared with tools/install-test-deps.sh) and
# unpacked into .cache/docs-js/, which docs/conf.py adds to html_static_path, so
# the built pages serve them from _static/ and no page ever asks a CDN.
# Idempotent: does nothing when the files are already there. Needs npm.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
HTML_MANAGER=@jupyter-widgets/html-manager@1.0.15
REQUIREJS=requirejs@2.3.8
cache="$here/.cache/npm"
out="$here/.cache/docs-js"

if [ -f "$out/embed-amd.js" ] && [ -f "$out/require.js" ] && [ -f "$out/VERSIONS" ] \
        && [ "$(cat "$out/VERSIONS")" = "$HTML_MANAGER $REQUIREJS" ]; then
    exit 0
fi
command -v npm > /dev/null 2>&1 || { echo "fetch-docs-js: npm is needed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$cache"

# npm pack names the tarball <scope>-<name>-<version>.tgz; reuse it when present.
pack() {
    local spec=$1 tarball=$2
    if [ ! -s "$cache/$tarball" ]; then
        (cd "$cache" && npm pack --silent "$spec" > /dev/null)
    fi
    [ -s "$cache/$tarball" ] || { echo "fetch-docs-js: npm pack $spec did not give $tarball" >&2; exit 1; }
}
pack "$HTML_MANAGER" jupyter-widgets-html-manager-1.0.15.tgz
pack "$REQUIREJS" requirejs-2.3.8.tgz

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging/html-manager" "$staging/requirejs" "$staging/out"
tar xzf "$cache/jupyter-widgets-html-manager-1.0.15.tgz" -C "$staging/html-manager"
tar xzf "$cache/requirejs-2.3.8.tgz" -C "$staging/requirejs"
# embed-amd.js loads its fonts relative to itself: copy them alongside.
find "$staging/html-manager/package/dist" -maxdepth 1 -type f \
    \( -name 'embed-amd.js' -o -name '*.woff' -o -name '*.woff2' -o -name '*.ttf' -o -name '*.eot' \
       -o -name '*.svg' -o -name '*.LICENSE.txt' \) -exec cp {} "$staging/out/" \;
cp "$staging/requirejs/package/require.js" "$staging/out/require.js"
echo "$HTML_MANAGER $REQUIREJS" > "$staging/out/VERSIONS"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$staging/out" "$out"
