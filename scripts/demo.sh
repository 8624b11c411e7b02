#!/usr/bin/env bash
# Placeholder: the demo curation is wired by the lead (this file is replaced on main).
echo "scripts/demo.sh: demo not yet wired" >&2
exit 1
