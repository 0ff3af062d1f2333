#!/usr/bin/env bash
# Make sure the local services ticketgate needs are reachable; start them, or install them from
# Debian's packages when they are missing. Usage: ensure-services.sh rabbitmq [postgresql] [chromium] [promtool] [cjk-fonts] ...
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 120); do port_open "$1" && return 0; sleep 0.5; done
  echo "ensure-services: nothing listens on 127.0.0.1:$1 after 60 s" >&2; return 1
}
apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_rabbitmq() {
  port_open 5672 && return 0
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  echo "ensure-services: starting RabbitMQ" >&2
  as_root rabbitmq-server -detached || true
  wait_port 5672
}

ensure_postgresql() {
  port_open 5432 && return 0
  local installed=""
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql; installed=1; fi
  local version
  version=$(ls /etc/postgresql | head -n1)
  echo "ensure-services: starting PostgreSQL $version" >&2
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port 5432
  if [ -n "$installed" ]; then
    # A server this script just installed is a throwaway test server: let the tests connect over
    # loopback as the current user (tests/support/postgres.py). An existing server is left alone.
    as_root sed -i '1i host all all 127.0.0.1/32 trust' "/etc/postgresql/$version/main/pg_hba.conf"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    as_root su postgres -c "psql -qc 'CREATE ROLE \"$(id -un)\" SUPERUSER LOGIN'" || true
  fi
}

ensure_cjk_fonts() {  # a font with Chinese glyphs, so browser tests and screenshots render 中文
  command -v fc-list >/dev/null && [ -n "$(fc-list :lang=zh family 2>/dev/null)" ] && return 0
  apt_install fonts-noto-cjk fontconfig
}

ensure_package() {  # ensure_package <command> <debian package>...
  command -v "$1" >/dev/null && return 0
  shift; apt_install "$@"
}

for service in "$@"; do
  case "$service" in
    rabbitmq) ensure_rabbitmq ;;
    postgresql) ensure_postgresql ;;
    chromium) ensure_package chromium chromium ;;
    swaks) ensure_package swaks swaks ;;
    dovecot) ensure_package /usr/sbin/dovecot dovecot-imapd ;;
    # promtool checks and unit-tests the alert rules under deploy/prometheus/.
    promtool) ensure_package promtool prometheus ;;
    # Chinese glyphs for the status page's zh screenshot (the tests skip CJK checks without it).
    cjk-fonts) ensure_cjk_fonts ;;
    *) echo "ensure-services: unknown service $service" >&2; exit 2 ;;
  esac
done
