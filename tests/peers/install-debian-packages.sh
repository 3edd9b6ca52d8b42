#!/usr/bin/env bash
# Install the Debian packages the test suite uses as peers (Postfix as a
# legacy SMTP client, swaks, Dovecot IMAP, msmtp, Sendmail's m4 macros, Chromium and its WebDriver
# for the web console's browser tests, PostgreSQL for the PostgreSQL store), non-interactively and
# idempotently.
#
# - Re-runs are fast: apt is skipped when every package is already installed.
# - Package installation must not start system services: a policy-rc.d that
#   exits 101 is in place for the duration of the install. One already there
#   that exits 101 (Docker images) is left as is; otherwise ours is removed
#   afterwards and any previous file restored.
# - Afterwards the system postfix/dovecot/postgresql services are stopped if
#   running; tests start their own private instances.
set -euo pipefail

PACKAGES=(postfix swaks dovecot-imapd msmtp m4 sendmail-cf systemd chromium chromium-driver postgresql)

if [[ ${EUID:-$(id -u)} -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -- "$0" "$@"
    fi
    echo "$(basename "$0"): must run as root (and sudo is not available)" >&2
    exit 1
fi

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == "installed" ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

stop_system_services() {
    local svc
    for svc in postfix dovecot postgresql; do
        if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
            systemctl stop "$svc" >/dev/null 2>&1 || true
        elif command -v service >/dev/null 2>&1; then
            service "$svc" stop >/dev/null 2>&1 || true
        fi
    done
    # Fallback when there is no init system: stop a system master still running
    # from the default configuration (tests use their own private instances).
    local pidfile pid
    for pidfile in /var/spool/postfix/pid/master.pid /run/dovecot/master.pid; do
        [[ -r $pidfile ]] || continue
        pid=$(tr -dc '0-9' <"$pidfile")
        [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || continue
        case $pidfile in
            */postfix/*) /usr/sbin/postfix stop >/dev/null 2>&1 || true ;;
            *) /usr/sbin/doveadm stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true ;;
        esac
    done
    # The package's default cluster (15/main on port 5432) if it is still online.
    local version cluster _port status _rest
    if command -v pg_lsclusters >/dev/null 2>&1; then
        while read -r version cluster _port status _rest; do
            [[ $status == online* ]] || continue
            pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true
        done < <(pg_lsclusters --no-header 2>/dev/null)
    fi
}

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "all packages already installed: ${PACKAGES[*]}"
    stop_system_services
    exit 0
fi

echo "installing: ${missing[*]}"

POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=
created_policy=0
cleanup() {
    if [[ $created_policy -eq 1 ]]; then
        rm -f "$POLICY"
        if [[ -n $POLICY_BACKUP ]]; then
            mv -f "$POLICY_BACKUP" "$POLICY"
        fi
    fi
}
trap cleanup EXIT
# Keep an existing policy-rc.d if it already forbids everything (as in Docker
# images); otherwise put ours in place and restore the original afterwards.
if [[ ! -e $POLICY ]] || ! grep -qx 'exit 101' "$POLICY"; then
    if [[ -e $POLICY ]]; then
        POLICY_BACKUP=$(mktemp "$POLICY.orig.XXXXXX")
        cp -p "$POLICY" "$POLICY_BACKUP"
    fi
    printf '#!/bin/sh\n# temporary: written by %s\nexit 101\n' "$(basename "$0")" >"$POLICY"
    chmod 0755 "$POLICY"
    created_policy=1
fi

debconf-set-selections <<'SEL'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
SEL

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"

stop_system_services
echo "installed: ${missing[*]}"
