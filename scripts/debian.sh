# Installs the Debian packages a script of Ponte's needs and the machine lacks, with apt-get, as
# root or through sudo. Sourced, not run:
#
#   . scripts/debian.sh
#   install_debian NAME PACKAGE...   NAME says which script asks, in the line it prints
install_debian() {
    local who=$1
    shift
    echo "$who: installing Debian's $*" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
