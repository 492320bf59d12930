#!/usr/bin/env bash
# The JavaScript the docs need to render saved widget state offline, from npm:
#   @jupyter-widgets/html-manager  dist/embed-amd.js (+ its font files)  BSD-3-Clause
#   requirejs                      require.js                            MIT
#   mathjax 3                      es5/tex-chtml.js and what it loads    Apache-2.0
# Tarballs are kept in .cache/npm/ (shared with tools/install-test-deps.sh) and
# unpacked into .cache/docs-js/widgets/ and .cache/docs-js/mathjax/. docs/conf.py
# runs this script and lists .cache/docs-js in html_static_path, so the built pages
# serve these files from _static/ and no page asks a CDN, for widgets or for maths.
# Idempotent: does nothing when the files are already there. Needs npm.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
HTML_MANAGER=@jupyter-widgets/html-manager@1.0.15
REQUIREJS=requirejs@2.3.8
MATHJAX=mathjax@3.2.2
cache="$here/.cache/npm"
out="$here/.cache/docs-js"

if [ -f "$out/widgets/embed-amd.js" ] && [ -f "$out/widgets/require.js" ] && [ -f "$out/mathjax/tex-chtml.js" ] && [ -f "$out/VERSIONS" ] \
        && [ "$(cat "$out/VERSIONS")" = "$HTML_MANAGER $REQUIREJS $MATHJAX" ]; then
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
pack "$MATHJAX" mathjax-3.2.2.tgz

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging/html-manager" "$staging/requirejs" "$staging/mathjax" "$staging/out/widgets"
tar xzf "$cache/jupyter-widgets-html-manager-1.0.15.tgz" -C "$staging/html-manager"
tar xzf "$cache/requirejs-2.3.8.tgz" -C "$staging/requirejs"
tar xzf "$cache/mathjax-3.2.2.tgz" -C "$staging/mathjax"
# embed-amd.js loads its fonts relative to itself: copy them alongside.
find "$staging/html-manager/package/dist" -maxdepth 1 -type f \
    \( -name 'embed-amd.js' -o -name '*.woff' -o -name '*.woff2' -o -name '*.ttf' -o -name '*.eot' \
       -o -name '*.svg' -o -name '*.LICENSE.txt' \) -exec cp {} "$staging/out/widgets/" \;
cp "$staging/requirejs/package/require.js" "$staging/out/widgets/require.js"
# MathJax: the TeX-to-HTML component and the pieces it loads on demand (TeX extensions,
# CHTML fonts, the menu and its accessibility tools), not the SVG output or combined builds.
es5="$staging/mathjax/package/es5"
mkdir -p "$staging/out/mathjax/output"
cp "$es5/tex-chtml.js" "$staging/mathjax/package/LICENSE" "$staging/out/mathjax/"
cp -r "$es5/input" "$es5/ui" "$es5/a11y" "$es5/sre" "$es5/adaptors" "$staging/out/mathjax/"
cp -r "$es5/output/chtml" "$es5/output/chtml.js" "$staging/out/mathjax/output/"
echo "$HTML_MANAGER $REQUIREJS $MATHJAX" > "$staging/out/VERSIONS"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$staging/out" "$out"
