#!/bin/sh
# The CPU serving image's `quantrol-worker`: engines run vLLM's CPU build in eager mode. The operator's engine
# command ends with `-- <vLLM flags>`, so the flag appended here reaches vLLM.
if [ "${1:-}" = serve ]; then
    exec /opt/quantrol/bin/quantrol-worker "$@" --enforce-eager
fi
exec /opt/quantrol/bin/quantrol-worker "$@"
