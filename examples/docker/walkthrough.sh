#!/bin/sh
# On a Docker host, step by step: containers discovered, judged by their labels.
#
#   sudo examples/docker/walkthrough.sh
#
# It makes a network (msdemo, 10.250.0.0/24) and three containers (shop-web,
# shop-frontend, stranger), runs `microseg run -i 'veth*'` with
# examples/docker/policy.yaml, shows `microseg workloads`, tries
# frontend -> web (allowed) and stranger -> web (denied), and removes all of
# it again, also when a step fails.
#
# DOCKER_HOST=unix:///path another engine's socket (default: /var/run/docker.sock)
# IMAGE        an image with busybox's sh, nc and httpd (default: busybox)
# MICROSEG     how to run microseg (default: microseg)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
sock=${DOCKER_HOST:-unix:///var/run/docker.sock}
sock=${sock#unix://}
image=${IMAGE:-busybox}
microseg=${MICROSEG:-microseg}
docker="docker -H unix://$sock"
work=$(mktemp -d /tmp/microseg-docker.XXXXXX)   # root's, 0700: a policy only root can change
daemon=

cleanup() {
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    $docker rm -f shop-web shop-frontend stranger >/dev/null 2>&1 || true
    $docker network rm msdemo >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

say() { printf '\n$ %s\n' "$*"; }
fetch() {  # fetch CONTAINER: what it gets from http://shop-web/ (nc: connect timeout 3 s)
    $docker exec "$1" sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 $web 80" 2>/dev/null \
        | tail -n 1 || true
}

say "docker network create --subnet 10.250.0.0/24 msdemo"
$docker network create --subnet 10.250.0.0/24 msdemo >/dev/null
say "docker run -d --name shop-web --label app=shop --label tier=web ... httpd"
$docker run -d --network msdemo --name shop-web --label app=shop --label tier=web "$image" \
    sh -c 'echo hello from shop-web > /tmp/index.html && exec httpd -f -p 80 -h /tmp' >/dev/null
say "docker run -d --name shop-frontend --label app=shop --label tier=frontend ..."
$docker run -d --network msdemo --name shop-frontend --label app=shop --label tier=frontend \
    "$image" sleep 3600 >/dev/null
say "docker run -d --name stranger ..."
$docker run -d --network msdemo --name stranger "$image" sleep 3600 >/dev/null
web=$($docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' shop-web)

sed "s|/var/run/docker.sock|$sock|" "$here/policy.yaml" > "$work/policy.yaml"
say "microseg policy check policy.yaml"
$microseg policy check "$work/policy.yaml"
say "microseg run -i 'veth*' --policy policy.yaml &"
$microseg run -i 'veth*' --policy "$work/policy.yaml" --socket "$work/microseg.sock" \
    --pin-dir /sys/fs/bpf/microseg-docker-demo --metrics off 2>"$work/daemon.log" &
daemon=$!
export MICROSEG_SOCKET="$work/microseg.sock"
tries=0
until $microseg workloads >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ $tries -gt 300 ] || ! kill -0 "$daemon" 2>/dev/null; then
        cat "$work/daemon.log" >&2; echo "walkthrough: the daemon did not start" >&2; exit 1
    fi
    sleep 0.1
done

say "microseg workloads"
$microseg workloads
say "docker exec shop-frontend: GET http://$web/"
got=$(fetch shop-frontend)
echo "${got:-(nothing)}"
[ "$got" = "hello from shop-web" ] || { echo "walkthrough: frontend -> web was not allowed" >&2; exit 1; }
say "docker exec stranger: GET http://$web/"
got=$(fetch stranger)
echo "${got:-(nothing: denied)}"
[ -z "$got" ] || { echo "walkthrough: stranger -> web was not denied" >&2; exit 1; }
say "microseg watch --type verdict --no-follow --last 20"
$microseg watch --type verdict --no-follow --last 20
echo
echo "walkthrough: done"
