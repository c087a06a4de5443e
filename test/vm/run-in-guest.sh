#!/usr/bin/env bash
# The guest runner moved to vm/run-in-guest.sh (shipped with the npm package,
# used by `mqtap demo`); this wrapper keeps `test/vm/run-in-guest.sh` working.
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/vm/run-in-guest.sh" "$@"
