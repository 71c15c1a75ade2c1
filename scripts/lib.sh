# Shared by scripts/dev and scripts/test: installs what Nexus needs, once.
# Debian/Ubuntu with apt; runs apt as root or through sudo.

TANSU_VERSION=0.6.0
# dynostore: memory storage; postgres: as the design asks; libsql: sqlite
# storage, which creates its own schema and survives a broker restart.
TANSU_FEATURES=dynostore,postgres,libsql

export PATH="$HOME/.cargo/bin:$PATH"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

ensure_build_tools() {
  local missing=()
  command -v cc >/dev/null || missing+=(build-essential)
  command -v make >/dev/null || missing+=(make)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  command -v perl >/dev/null || missing+=(perl)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing build tools: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
}

# rustfmt and clippy: scripts/test checks formatting and lints.
ensure_rust_components() {
  local missing=()
  cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
  cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing rust components: ${missing[*]}"
    rustup component add "${missing[@]}"
  fi
}

ensure_redis_server() {
  if ! command -v redis-server >/dev/null; then
    echo "installing redis-server"
    apt_install redis-server
  fi
}

ensure_tansu() {
  if ! command -v tansu >/dev/null || ! tansu --help 2>/dev/null | grep -q 'Storage engines:.*libsql'; then
    echo "installing tansu $TANSU_VERSION into ~/.cargo/bin (about 10 minutes on 2 cores, once)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features "$TANSU_FEATURES"
  fi
}

ensure_nextest() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest into ~/.cargo/bin (once)"
    cargo install cargo-nextest --locked
  fi
}

ensure_browser_tests() {
  local missing=()
  command -v python3 >/dev/null || missing+=(python3)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing for the browser and panel tests: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  npm ci --prefix ui-tests --no-audit --no-fund --loglevel=error
}

# Panel instances run in their own network namespace (iproute2's `ip`,
# util-linux's `nsenter`) under gVisor (`runsc`) when the user is root; the
# local driver falls back to a plain process, loudly, when they are missing.
ensure_sandbox() {
  local missing=()
  command -v python3 >/dev/null || missing+=(python3)  # the python_minimal template
  if [ "$(id -u)" != 0 ]; then
    echo "not root: panels will run without isolation (see README)"
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
    return 0
  fi
  command -v ip >/dev/null || missing+=(iproute2)
  command -v nsenter >/dev/null || missing+=(util-linux)
  command -v runsc >/dev/null || missing+=(runsc)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing the panel sandbox: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
}
