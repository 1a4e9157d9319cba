#!/usr/bin/env bash
# Installs the Debian packages Signpost's build, tests and demo need, when
# any is missing. Sourced by integration/test.sh and examples/demo.sh.
#   etcd-server                         the store (tests start their own etcd)
#   protobuf-compiler libprotobuf-dev   etcd-client compiles etcd's .proto files
#   bind9-dnsutils                      dig, used by the DNS tests and the demo
#   iproute2                            ip netns, for the multi-host tests
#   curl                                the demo's HTTP requests
#   knot knot-dnsutils                  Knot DNS as a zone-transfer secondary, kdig
signpost_install_deps() {
    local missing=()
    command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
    command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
    [ -e /usr/include/google/protobuf/timestamp.proto ] || missing+=(libprotobuf-dev)
    command -v dig >/dev/null 2>&1 || missing+=(bind9-dnsutils)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v knotd >/dev/null 2>&1 || missing+=(knot)
    command -v kdig >/dev/null 2>&1 || missing+=(knot-dnsutils)
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    echo "installing missing packages: ${missing[*]}"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "error: need root (or sudo) to apt-get install ${missing[*]}" >&2
            return 1
        fi
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
}
