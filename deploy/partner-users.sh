#!/usr/bin/env bash
# Creates one broker user per partner with the least rights Ponte's contract needs, so that a
# partner can publish only to its own inbound exchange and read only its own outbound and
# receipt queues. "sender = queue owner" is a proof of origin only with these permissions.
#
#   PONTE_PARTNER_PASSWORD_<ID>   password of each partner's user (ID upper-cased, '-' -> '_'),
#                                 e.g. PONTE_PARTNER_PASSWORD_CPI_MODENA
#   RABBITMQCTL                   rabbitmqctl command line (default: rabbitmqctl)
#   PREFIX / VHOST                queue prefix (default ponte) and virtual host (default /)
#
# usage: deploy/partner-users.sh inps cpi-modena cpi-bologna comune-modena osservatorio-er
set -euo pipefail
ctl=${RABBITMQCTL:-rabbitmqctl}
prefix=${PREFIX:-ponte}
vhost=${VHOST:-/}
esc_prefix=${prefix//./\\.}
for partner in "$@"; do
    var="PONTE_PARTNER_PASSWORD_$(echo "$partner" | tr 'a-z-' 'A-Z_')"
    password=${!var:?set $var}
    $ctl add_user "$partner" "$password" >/dev/null 2>&1 || $ctl change_password "$partner" "$password"
    # configure: nothing; write: its inbound exchange; read: its outbound and receipt queues.
    $ctl set_permissions -p "$vhost" "$partner" '^$' \
        "^${esc_prefix}\\.in\\.${partner}\$" \
        "^${esc_prefix}\\.(out|receipts)\\.${partner}\$"
done
