# Sourced by scripts/test: make PostgreSQL's server binaries available to the tests.
#
# Only the binaries: tests/postgres.py starts a server of its own (initdb in a
# temporary dir, postgres on 127.0.0.1, as an unprivileged user when run as
# root) and stops it afterwards. Debian's cluster service is never started:
# no main cluster is created, and policy-rc.d refuses service starts while the
# packages install.
#
# Found: CORTEX_TEST_PG_BINDIR if set, else /usr/lib/postgresql/*/bin. Missing
# and root with apt-get (CI): install Debian's `postgresql` package. Missing
# otherwise: say how, and go on (the PostgreSQL tests skip, or fail under CI).
pg_log=".venv/postgresql-install.log"

pg_in_ci() {  # as tests/postgres.py reads CI: set, and not 0/false/no
    case "$(printf '%s' "${CI:-}" | tr '[:upper:]' '[:lower:]')" in
        "" | 0 | false | no) return 1 ;;
        *) return 0 ;;
    esac
}

pg_binaries_present() {
    if [ -n "${CORTEX_TEST_PG_BINDIR:-}" ]; then
        return 0  # the tests check it, and say what is wrong with it
    fi
    compgen -G "/usr/lib/postgresql/*/bin/postgres" > /dev/null
}

pg_install() {
    local policy=/usr/sbin/policy-rc.d own_policy="" started=$SECONDS status=0
    echo "installing PostgreSQL from Debian's packages (log: $pg_log) ..." >&2
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# cortex scripts/test: no service starts during the install\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    # The official postgres image's recipe: postgresql-common first, told to create
    # no cluster, then the server; --force-confold keeps that edit.
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q &&
        apt-get install -y -q --no-install-recommends postgresql-common &&
        sed -ri 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' \
            /etc/postgresql-common/createcluster.conf &&
        apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold postgresql
    } > "$pg_log" 2>&1 || status=$?
    if [ -n "$own_policy" ]; then
        rm -f "$policy"
    fi
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$pg_log" >&2
        echo "installing PostgreSQL failed (exit $status); the whole log is in $pg_log" >&2
        return 1
    fi
    if ! pg_binaries_present; then
        tail -n 40 "$pg_log" >&2
        echo "apt-get installed postgresql, yet no /usr/lib/postgresql/*/bin/postgres appeared; see $pg_log" >&2
        return 1
    fi
    echo "installed PostgreSQL in $((SECONDS - started)) s" >&2
}

if ! pg_binaries_present; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        if ! pg_install && pg_in_ci; then
            exit 1  # the PostgreSQL tests cannot pass; say so now, not after the suite
        fi
    else
        echo "note: no PostgreSQL server binaries (/usr/lib/postgresql/*/bin); the PostgreSQL tests will skip" \
             "(install them with \`sudo apt-get install postgresql\`, or set CORTEX_TEST_PG_BINDIR)" >&2
    fi
fi
