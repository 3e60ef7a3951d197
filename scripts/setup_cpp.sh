#!/usr/bin/env bash
# C++ runtime dependencies (cpp/), by package name; idempotent and fast when already done.
#   scripts/setup_cpp.sh [PYTHON]
# * Debian packages (apt-get): cmake, g++, GoogleTest, nlohmann-json, sentencepiece, PCRE2, OpenSSL,
#   cpp-httplib (the HTTP example).
# * ONNX Runtime's C/C++ headers from Debian trixie's libonnxruntime-dev (1.21): `apt-get download` +
#   `dpkg -x` into build/ort-headers, through a private apt configuration under build/apt-trixie (the
#   system's sources and policy are not touched). The library itself is the one inside the installed
#   onnxruntime wheel (onnxruntime/capi/libonnxruntime.so.*); cpp/CMakeLists.txt finds it through PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="cmake g++ make pkg-config libgtest-dev nlohmann-json3-dev libsentencepiece-dev libpcre2-dev libssl-dev libcpp-httplib-dev"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ -n "$missing" ]; then
  echo "setup_cpp: installing$missing" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null; }
fi

HDR=build/ort-headers
if [ ! -f "$HDR/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
  APT=$PWD/build/apt-trixie
  mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/etc/preferences.d" "$APT/etc/apt.conf.d"
  cat > "$APT/etc/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-trixie-stable.gpg] http://deb.debian.org/debian trixie main
SRC
  opts=(-o Dir::Etc::sourcelist="$APT/etc/sources.list" -o Dir::Etc::sourceparts="-"
        -o Dir::Etc::preferencesparts="$APT/etc/preferences.d" -o Dir::State::Lists="$APT/lists"
        -o Dir::Cache::Archives="$APT/archives" -o Dir::Cache="$APT/cache" -o APT::Get::List-Cleanup=0
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  mkdir -p "$APT/cache"
  apt-get "${opts[@]}" update -q >/dev/null
  (cd "$APT/archives" && apt-get "${opts[@]}" download libonnxruntime-dev >/dev/null)
  rm -rf "$HDR.tmp" && mkdir -p "$HDR.tmp"
  dpkg -x "$APT"/archives/libonnxruntime-dev_*.deb "$HDR.tmp/deb"
  mkdir -p "$HDR.tmp/include"
  cp -r "$HDR.tmp/deb/usr/include/onnxruntime" "$HDR.tmp/include/"
  rm -rf "$HDR.tmp/deb" "$HDR" && mv "$HDR.tmp" "$HDR"
  echo "setup_cpp: ONNX Runtime headers $(ls "$APT"/archives/libonnxruntime-dev_*.deb | xargs -n1 basename) -> $HDR" >&2
fi
