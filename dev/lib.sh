# Shared set-up for dev/run and dev/test (sourced, not run).
# Makes a virtual environment and installs what the daemon and its tests
# need: system programs through apt-get (as root, or with sudo), Python
# packages either from PyPI (STOP_DEPS=pypi, the default) or Debian 12's own
# (STOP_DEPS=debian: python3-twisted 22.4 & co from apt, in a venv made with
# --system-site-packages; the .deb runs on those).

STOP_DEPS=${STOP_DEPS:-pypi}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

# Programs the tests run for real, and the Debian Python stack.
APT_TEST="python3 python3-venv socat netcat-openbsd netcat-traditional iproute2 procps psmisc oidentd libnet-ident-perl tcpd util-linux rsyslog graphviz openssl openssh-server openssh-client passwd"
APT_DEBIAN="python3-twisted python3-psutil python3-zope.interface python3-service-identity python3-openssl python3-pytest python3-hypothesis"

apt_install() {
    # Install the named Debian packages that are missing; no network when
    # all are there already.
    missing=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "dev: not a Debian system; please install:$missing" >&2
        return 0
    fi
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            echo "dev: not root and no sudo; tests needing these will be skipped:$missing" >&2
            return 0
        fi
    fi
    echo "dev: apt-get install$missing" >&2
    $SUDO apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing >&2
}

make_venv() {
    # $1: extras to install ("" or "test"). Sets VENV and puts it first on PATH.
    extras=$1
    case "$STOP_DEPS" in
        pypi)
            VENV="$ROOT/.venv"
            PY=$(command -v python3)
            VENV_ARGS="" ;;
        debian)
            apt_install $APT_DEBIAN
            VENV="$ROOT/.venv-debian"
            PY=/usr/bin/python3
            VENV_ARGS="--system-site-packages" ;;
        *) echo "dev: STOP_DEPS must be pypi or debian, not $STOP_DEPS" >&2; exit 2 ;;
    esac
    stamp="$VENV/.stop-installed"
    want="$STOP_DEPS $extras $(cat setup.cfg pyproject.toml | cksum)"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv $VENV_ARGS "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        spec="."
        [ -n "$extras" ] && spec=".[$extras]"
        if [ "$STOP_DEPS" = debian ]; then
            # Only our own code from the checkout: every dependency must
            # come from Debian's packages (pytest and hypothesis too).
            "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
        else
            "$VENV/bin/python" -m pip install -q --upgrade pip
            "$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e "$spec"
        fi
        # twistd finds plugins in twisted/plugins/ of each sys.path entry;
        # an editable install maps only the stop package, so put the
        # checkout itself on sys.path too.
        site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "$ROOT" > "$site/stop-checkout.pth"
        echo "$want" > "$stamp"
    fi
    PATH="$VENV/bin:$PATH"
    export PATH VIRTUAL_ENV="$VENV"
    # twistd writes its plugin cache next to the plugin; keep it out of git.
    rm -f twisted/plugins/dropin.cache
}
