#!/bin/sh
# Entry point of the mtrec training images (Dockerfile.cpu, Dockerfile.cuda).
#
#   docker run IMAGE run --config /opt/mtrec/configs/experiments/demo.yaml   -> mtrec run --config ...
#   docker run IMAGE --help                                                   -> mtrec --help
#   docker run IMAGE bash | ray start ... | python ...                         -> that program
#
# Why not a plain ENTRYPOINT ["mtrec"]: the same image is also a Ray node. `ray up` starts its containers as
# `docker run ... IMAGE bash` and KubeRay runs `/bin/bash -c "ray start ..."`; with ENTRYPOINT ["mtrec"] the first
# would become `mtrec bash` and fail. So an argument that names a program on PATH runs that program; anything
# else (a subcommand such as run/train/daily, or an option) goes to the mtrec CLI.
set -e

if [ "$#" -eq 0 ]; then
  exec mtrec --help
fi

case "$1" in
  -*) exec mtrec "$@" ;;
esac

if command -v "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec mtrec "$@"
