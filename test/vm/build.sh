#!/usr/bin/env bash
# The guest image builder moved to vm/build.sh (shipped with the npm package,
# used by `mqtap demo`); this wrapper keeps `bash test/vm/build.sh` working.
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/vm/build.sh" "$@"
