# Installs whatever is missing, and nothing when nothing is; sourced by scripts/chat and
# scripts/test.  Usage: setup_project [pip-extras]
# - Debian packages: python3-venv and g++ (llama-cpp-python compiles llama.cpp on first
#   install), espeak-ng (speech), and with the test tools PostgreSQL's server binaries (the
#   tests start their own server in a temporary folder) and chromium with chromium-driver (the
#   web page's tests run it headless).  Installed with apt-get as root, or
#   sudo, when missing.
# - .venv with this project installed (editable).  Re-installed only when pyproject.toml
#   changes or another set of extras is asked for (none after the tests' set, which holds the
#   chat's); pip's wheel cache makes the llama.cpp build a one-time cost.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

_say() { printf '\033[2m[setup] %s\033[0m\n' "$*" >&2; }

_apt_install() {
  local runner=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then runner=(sudo); else
      _say "please install these Debian packages: $* (no root, no sudo)"; return 1
    fi
  fi
  _say "installing Debian packages: $*"
  "${runner[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    "${runner[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup_project() {
  local extras="${1:-}"
  local python="${PYTHON:-python3}"
  local need=()
  if ! [ -x "$VENV/bin/python" ]; then
    "$python" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
    command -v g++ >/dev/null 2>&1 || need+=(g++)
  fi
  command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
  if [ "$extras" = dev ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    need+=(postgresql)
  fi
  # The web page's tests drive Debian's browser through its own driver (nothing downloaded).
  if [ "$extras" = dev ] && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
    need+=(chromium chromium-driver)
  fi
  # The crash-state tests record the file store's system calls (tests/crash_states.py).
  if [ "$extras" = dev ] && ! command -v strace >/dev/null 2>&1; then
    need+=(strace)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    _apt_install "${need[@]}" || _say "continuing without: ${need[*]}"
  fi
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    _say "Python 3.10 or newer is needed ($python is $("$python" --version 2>&1))"; return 1
  fi
  if ! [ -x "$VENV/bin/python" ]; then
    _say "creating $VENV"
    "$python" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed${extras:+-$extras}"
  local want
  want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-32)"
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  # The test tools' set (dev) holds everything the chat's (all) does: after ./scripts/test,
  # ./scripts/chat has nothing to install.
  if [ "$extras" = all ] && [ "$(cat "$VENV/.installed-dev" 2>/dev/null)" = "$want" ]; then
    echo "$want" > "$stamp"
    return 0
  fi
  _say "$(_install_what "$extras" "$want")"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT${extras:+[$extras]}"
  echo "$want" > "$stamp"
}

# What the install about to run really does, in one line: llama.cpp is compiled only when
# llama_cpp cannot be imported yet (and then only once: pip caches the wheel).
_install_what() {
  local extras="$1" want="$2" what="the project" other
  case "$extras" in
    all) what="the chat's extras" ;;
    dev) what="the test tools" ;;
  esac
  if ! "$VENV/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
    echo "installing the project into .venv; the first time this compiles llama.cpp from source (about 5 minutes on 2 cores, once: pip caches the result)"
    return
  fi
  for other in "$VENV"/.installed*; do
    if [ "$(cat "$other" 2>/dev/null)" = "$want" ]; then
      echo "installing $what into .venv (llama.cpp is already built)"
      return
    fi
  done
  echo "pyproject.toml changed: updating the project in .venv (llama.cpp is already built)"
}
