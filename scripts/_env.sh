# Sourced by the GPU scripts in this folder: work from the repo root (OUT and SITE_ARCHIVE, when
# given, are taken relative to where the script was started), unbuffered Python, and optionally the
# packages of a packed site folder (SITE_ARCHIVE; see scripts/README.md).
[ -n "${OUT:-}" ] && OUT=$(realpath -m "$OUT")
[ -n "${SITE_ARCHIVE:-}" ] && SITE_ARCHIVE=$(realpath -m "$SITE_ARCHIVE")
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
if [ -n "${SITE_ARCHIVE:-}" ]; then
  mkdir -p .site && tar xf "$SITE_ARCHIVE" -C .site || exit 1
  export PYTHONPATH=$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
