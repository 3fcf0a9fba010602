#!/usr/bin/env bash
# Installs and starts what the InterCode tests need (idempotent; run as root on a fresh Debian/Ubuntu machine):
#   apt: bubblewrap (the Bash sandbox), mariadb-server (the SQL backend), jq (used by one benchmark task)
#   pip: intercode-bench, icalfa (the task data; --no-deps: their docker/gym/sklearn trees are not needed), PyMySQL
#   MariaDB: lower_case_table_names=1 (as upstream), started, Spider databases loaded, read-only user created.
# PYTHON may name the interpreter of the project's environment (default: /work/venv/bin/python, else python3).
set -euo pipefail

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x /work/venv/bin/python ]; then PY=/work/venv/bin/python; else PY="$(command -v python3)"; fi
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v mariadbd >/dev/null 2>&1 || command -v mysqld >/dev/null 2>&1 || need+=(mariadb-server)
command -v jq >/dev/null 2>&1 || need+=(jq)
if [ "${#need[@]}" -gt 0 ]; then
  echo "services: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "services: pip packages"
"$PY" -m pip install -q --disable-pip-version-check --no-deps "intercode-bench==0.1.22" "icalfa==0.3.6"
"$PY" -c "import pymysql" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check "PyMySQL>=1.1"

# MariaDB: upstream's container runs with --lower_case_table_names=1 (the gold queries say `Student`, the dump `student`)
CNF_DIR=/etc/mysql/mariadb.conf.d
[ -d "$CNF_DIR" ] || CNF_DIR=/etc/mysql/conf.d
CNF="$CNF_DIR/60-leap-intercode.cnf"
WANT=$'[mysqld]\nlower_case_table_names = 1\n'
restart=0
if [ ! -f "$CNF" ] || [ "$(cat "$CNF")" != "${WANT%$'\n'}" ]; then
  printf '%s' "$WANT" | $SUDO tee "$CNF" >/dev/null
  restart=1
fi

running() { mariadb-admin ping >/dev/null 2>&1 || mysqladmin ping >/dev/null 2>&1; }
start_db() {
  $SUDO service mariadb start >/dev/null 2>&1 || $SUDO service mysql start >/dev/null 2>&1 || {
    $SUDO mkdir -p /run/mysqld && $SUDO chown mysql:mysql /run/mysqld
    $SUDO sh -c 'nohup mysqld_safe >/dev/null 2>&1 &'
  }
  for _ in $(seq 1 60); do running && return 0; sleep 1; done
  echo "services: MariaDB did not start" >&2; return 1
}
if running; then
  lc="$(mariadb -N -e 'SELECT @@lower_case_table_names' 2>/dev/null || echo 0)"
  if [ "$restart" = 1 ] || [ "$lc" != 1 ]; then
    echo "services: restarting MariaDB with lower_case_table_names=1"
    $SUDO service mariadb restart >/dev/null 2>&1 || { $SUDO service mariadb stop || true; start_db; }
    for _ in $(seq 1 60); do running && break; sleep 1; done
  fi
else
  echo "services: starting MariaDB"
  start_db
fi

"$PY" -m leap_dspy.envs.intercode --load-mysql --build-sqlite
bwrap --ro-bind / / --unshare-pid --unshare-net true && echo "services: bubblewrap works"
